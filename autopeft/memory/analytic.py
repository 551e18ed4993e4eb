"""The analytic level: closed-form peak bytes, instant and approximate (see the package docstring)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from autopeft.memory.result import MemoryEstimate

# Bytes of optimizer state per trainable weight, in units of the parameter's element size.
_MOMENTS = {"adamw": 2, "sgd": 1}


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """Exactly what the optimizer of `autopeft.train.build_optimizer` holds after its first step.

    AdamW (torch): two moments like the parameter plus a 4-byte step counter per tensor. SGD with momentum:
    one buffer. Adafactor (transformers, no first moment): row and column second moments for a matrix
    (a full one for a vector) plus a 0-d RMS per tensor. 8-bit AdamW (bitsandbytes): see `_adamw_8bit_state`.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    eight_bit = optimizer == "adamw_8bit" and any(p.numel() >= 4096 for p in trainable)
    shared = _ADAMW_8BIT_CODE_MAPS if eight_bit else 0
    return shared + sum(_param_state_bytes(p, optimizer) for p in trainable)


def _param_state_bytes(param: torch.Tensor, optimizer: str) -> int:
    size = param.element_size()
    if optimizer == "adafactor":
        if param.dim() >= 2:
            rows = math.prod(param.shape[:-1])
            cols = math.prod(param.shape[:-2]) * param.shape[-1]
            return size * (rows + cols) + size
        return size * param.numel() + size
    if optimizer == "adamw_8bit":
        return _adamw_8bit_state(param.numel())
    if optimizer not in _MOMENTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: adamw, adafactor, sgd, adamw_8bit")
    step_counter = 4 if optimizer == "adamw" else 0
    return _MOMENTS[optimizer] * size * param.numel() + step_counter


_ADAMW_8BIT_CODE_MAPS = 2 * 256 * 4  # two 256-entry fp32 code maps, one pair shared by all 8-bit tensors


def _adamw_8bit_state(numel: int, min_8bit_size: int = 4096, block: int = 256) -> int:
    """bitsandbytes keeps fp32 moments for tensors under 4096 elements (most LoRA matrices!); larger ones
    get two uint8 moments and an fp32 absmax per 256-element block each (plus the shared code maps)."""
    if numel < min_8bit_size:
        return 8 * numel
    return 2 * numel + 2 * 4 * -(-numel // block)


def activation_bytes(model: nn.Module, *, micro_batch_size: int, seq_len: int, precision: str,
                     gradient_checkpointing: bool = False) -> int:
    config = model.config if hasattr(model, "config") else None
    layers = getattr(config, "num_hidden_layers", 1)
    hidden = getattr(config, "hidden_size", 1)
    heads = getattr(config, "num_attention_heads", 1)
    per_layer_16bit = seq_len * micro_batch_size * hidden * (34 + 5 * heads * seq_len / hidden)
    scale = 2.0 if precision == "fp32" else 1.0
    if gradient_checkpointing:  # each layer's input kept (2 bytes/value in 16 bit), one layer recomputed
        return int((layers * seq_len * micro_batch_size * hidden * 2 + per_layer_16bit) * scale)
    return int(layers * per_layer_16bit * scale)


def logits_bytes(model: nn.Module, *, micro_batch_size: int, seq_len: int, precision: str,
                 task_type: str) -> int:
    """A causal LM's logits over the vocabulary: in the compute dtype, their fp32 copy for the loss, its
    log-softmax and the gradient flowing back (a classification head's few logits are negligible)."""
    if task_type != "CAUSAL_LM":
        return 0
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0)
    compute = 4 if precision == "fp32" else 2
    return micro_batch_size * seq_len * vocab * (compute + 3 * 4)


def autocast_copy_bytes(model: nn.Module, *, precision: str, gradient_checkpointing: bool) -> int:
    """Under 16-bit autocast every matmul casts its fp32 weight to 16 bits, and backward keeps that copy to
    carry the gradient through the layer: half the block weights again, for the whole step. With
    checkpointing a layer's copies live only while it is recomputed (counted in its activations)."""
    if precision == "fp32" or gradient_checkpointing:
        return 0
    matmul_weights = (p for name, p in model.named_parameters()
                      if p.dim() == 2 and p.dtype == torch.float32 and "embed" not in name and "wte" not in name
                      and "wpe" not in name)
    return sum(2 * p.numel() for p in matmul_weights)


def estimate(model: nn.Module, *, optimizer: str, precision: str, micro_batch_size: int, seq_len: int,
             gradient_checkpointing: bool = False, task_type: str = "SEQ_CLS") -> MemoryEstimate:
    """Analytic peak bytes of one training step of `model` (adapter already attached) at this configuration."""
    start = time.perf_counter()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        weights=frozen + sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable=trainable,
        gradients=trainable,
        optimizer_state=optimizer_state_bytes(model, optimizer),
        activations=activation_bytes(model, micro_batch_size=micro_batch_size, seq_len=seq_len,
                                     precision=precision, gradient_checkpointing=gradient_checkpointing)
        + logits_bytes(model, micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision,
                       task_type=task_type)
        + autocast_copy_bytes(model, precision=precision, gradient_checkpointing=gradient_checkpointing),
        seconds=time.perf_counter() - start,
    )
