"""(IA)^3 (Liu et al. 2022) through peft: learned per-channel scaling of keys, values and feed-forward inputs."""

from __future__ import annotations

from typing import Any

from torch import nn

from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import IA3_TARGET_SETS, family, ia3_modules


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    from peft import IA3Config, get_peft_model

    targets, feedforward = ia3_modules(model, params["target_modules"])
    config = IA3Config(task_type=context.task_type, target_modules=targets, feedforward_modules=feedforward,
                       fan_in_fan_out=family(model) == "gpt2")  # GPT-2's Conv1D stores weights in x out
    return get_peft_model(model, config)


register(
    Method(
        name="ia3",
        summary="Learned scaling vectors on keys, values (and feed-forward inputs); very few parameters (peft).",
        params={
            "target_modules": ParamSpec("choice", "kv_ffn", "which activations get a scaling vector",
                                        choices=tuple(IA3_TARGET_SETS)),
        },
        apply=apply,
        peft_backed=True,
        can_merge=True,
    )
)
