"""Prompt tuning (Lester et al. 2021) through peft: trainable virtual-token embeddings prepended to the input.
The base model is untouched, so its general ability is intact when the prompt is removed; it cannot be
merged into the weights."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from autopeft.data import left_padded_positions
from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import family, resolve_model_path

# A phrase for text initialisation; peft tokenizes it with the model's own tokenizer.
INIT_TEXT = "Classify the sentiment of this review:"
# Left-padded decoder batches carry position ids (autopeft.data.left_padded_positions); peft's prompt tuning
# drops them, with this warning on every forward pass, and `count_positions_from_row_starts` puts them back.
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
    adapted = get_peft_model(model, config)
    count_positions_from_row_starts(adapted)
    return adapted


def count_positions_from_row_starts(model: nn.Module) -> None:
    """Give the wrapped model position ids counted over [virtual tokens, the row's own tokens], skipping the
    padding between them. Without them a left-padded row sat as far from the virtual tokens as its batch's
    padding put it, and a decoder's score of a row depended on the rows batched with it. A row with no
    padding gets the positions peft gives it, so the trained prompt means the same to plain peft. Decoders only:
    an encoder pads on the right, after the row, so its positions are right already."""
    if family(model.base_model) != "bert":
        model.base_model.register_forward_pre_hook(_positions_from_row_starts, with_kwargs=True)


def on_load(model: nn.Module) -> None:
    """After peft loads a saved adapter: prompt tuning counts positions as it was trained with."""
    from peft import PeftType

    if model.peft_config[model.active_adapter].peft_type == PeftType.PROMPT_TUNING:
        count_positions_from_row_starts(model)


def _positions_from_row_starts(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    mask, embeds = kwargs.get("attention_mask"), kwargs.get("inputs_embeds")
    if kwargs.get("position_ids") is None and mask is not None and embeds is not None:
        # peft prepends a float mask of ones for the virtual tokens: positions must be integers
        kwargs["position_ids"] = left_padded_positions(mask.long())[:, -embeds.shape[1]:]
    return args, kwargs


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
