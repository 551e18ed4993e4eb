"""Prompt tuning (Lester et al. 2021) through peft: trainable virtual-token embeddings prepended to the input.
The base model is untouched, so its general ability is intact when the prompt is removed; it cannot be
merged into the weights."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import resolve_model_path

# A phrase for text initialisation; peft tokenizes it with the model's own tokenizer.
INIT_TEXT = "Classify the sentiment of this review:"
# Left-padded decoder batches carry position ids (autopeft.data.left_padded_positions); peft's prompt tuning
# drops them, with this warning on every forward pass. Its rows then keep transformers' column positions.
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    from_text = params["init"] == "text"
    config = PromptTuningConfig(
        task_type=context.task_type,
        num_virtual_tokens=int(params["num_virtual_tokens"]),
        prompt_tuning_init=PromptTuningInit.TEXT if from_text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=INIT_TEXT if from_text else None,
        tokenizer_name_or_path=resolve_model_path(model.config.name_or_path) if from_text else None,
    )
    return get_peft_model(model, config)


register(Method(
    name="prompt",
    summary="Trainable virtual-token embeddings prepended to every input (peft prompt tuning).",
    params={
        "num_virtual_tokens": ParamSpec("int", 20, "number of virtual tokens", low=1, high=512),
        "init": ParamSpec("choice", "random", "initialise from random vectors or from the embeddings of the text " + repr(INIT_TEXT),
                          choices=("random", "text")),
    },
    apply=apply, peft_backed=True, can_merge=False,
    added_positions=lambda params: int(params["num_virtual_tokens"])))
