"""LoRA (Hu et al. 2021) through peft: a trainable low-rank update B·A beside each targeted linear layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import TARGET_SETS, family, target_modules

if TYPE_CHECKING:
    from peft import LoraConfig


def lora_config(model: nn.Module, params: dict[str, Any], task_type: str, **extra: Any) -> LoraConfig:
    """peft's LoraConfig from searched parameters; `extra` switches on variants (DoRA: use_dora=True)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=int(params["r"]),
        lora_alpha=float(params["alpha"]),
        lora_dropout=float(params["dropout"]),
        target_modules=target_modules(model, params["target_modules"]),
        use_rslora=bool(params["use_rslora"]),
        fan_in_fan_out=family(model) == "gpt2",  # GPT-2's Conv1D stores weights in x out (peft warned each trial)
        **extra,
    )


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, params, context.task_type))


LORA_PARAMS = {
    "r": ParamSpec("int", 8, "rank of the update", low=1, high=1024),
    "alpha": ParamSpec("float", 16.0, "scaling numerator: the update is multiplied by alpha/r", low=1e-6),
    "dropout": ParamSpec("float", 0.0, "dropout on the adapter's input", low=0.0, high=0.9),
    "target_modules": ParamSpec("choice", "qv", "which linear layers get an adapter", choices=tuple(TARGET_SETS)),
    "use_rslora": ParamSpec("bool", False, "scale by alpha/sqrt(r) instead of alpha/r (rsLoRA)"),
}

register(Method(name="lora", summary="Low-rank update B·A (scaled by alpha/r) beside each targeted linear layer (peft).",
                params=LORA_PARAMS, apply=apply, peft_backed=True, can_merge=True))
