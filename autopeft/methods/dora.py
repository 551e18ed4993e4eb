"""DoRA (Liu et al. 2024) through peft (`use_dora`): LoRA on the direction of each weight, plus a learned
magnitude per output channel. Same search parameters as LoRA; slower per step than LoRA."""

from __future__ import annotations

from typing import Any

from torch import nn

from autopeft.methods import Method, MethodContext, register
from autopeft.methods.lora import LORA_PARAMS, lora_config


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, params, context.task_type, use_dora=True))


register(Method(name="dora", summary="Weight-decomposed LoRA: low-rank direction update plus a learned magnitude (peft).",
                params=LORA_PARAMS, apply=apply, peft_backed=True, can_merge=True))
