"""Peak training memory of one configuration, predicted before it trains (analytic level).

bytes = base weights + trainable weights + their gradients + optimizer state + activations.
Activations follow Korthikanti et al. 2022 (per transformer layer, 16-bit: s·b·h·(34 + 5·a·s/h) bytes),
doubled for fp32 storage. With a frozen base, backward still needs every layer's activations to carry
the gradient down to the lowest adapter, so the formula applies to PEFT as to full fine-tuning.
This analytic level is deliberately simple; a traced estimator and real measurements are future work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from autopeft.config import format_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_state + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in asdict(self).items())
        return f"{format_bytes(self.total)} ({parts})"


# Bytes of optimizer state per trainable weight (vectors and non-factored cases).
_STATE_BYTES_PER_WEIGHT = {"adamw": 8, "sgd": 4, "adamw_8bit": 2, "adafactor": 4}


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """AdamW: two fp32 moments per weight; SGD: one momentum buffer; 8-bit AdamW: two 1-byte moments;
    Adafactor (no first moment): row and column second moments for a matrix, a full one for a vector."""
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if optimizer == "adafactor" and param.dim() >= 2:
            total += 4 * (param.shape[-2] + param.shape[-1])
        elif optimizer == "adamw_8bit":
            total += _adamw_8bit_state(param.numel())
        else:
            total += _STATE_BYTES_PER_WEIGHT[optimizer] * param.numel()
    return total


def _adamw_8bit_state(numel: int, min_8bit_size: int = 4096, block: int = 256) -> int:
    """bitsandbytes keeps fp32 moments for tensors under 4096 elements (most LoRA matrices!); larger ones
    get two uint8 moments, an fp32 absmax per 256-element block each, and two 256-entry fp32 code maps."""
    if numel < min_8bit_size:
        return 8 * numel
    return 2 * numel + 2 * 4 * -(-numel // block) + 2 * 256 * 4


def activation_bytes(model: nn.Module, *, micro_batch_size: int, seq_len: int, precision: str) -> int:
    config = model.config if hasattr(model, "config") else None
    layers = getattr(config, "num_hidden_layers", 1)
    hidden = getattr(config, "hidden_size", 1)
    heads = getattr(config, "num_attention_heads", 1)
    per_layer_16bit = seq_len * micro_batch_size * hidden * (34 + 5 * heads * seq_len / hidden)
    scale = 2.0 if precision == "fp32" else 1.0
    return int(layers * per_layer_16bit * scale)


def estimate(model: nn.Module, *, optimizer: str, precision: str, micro_batch_size: int, seq_len: int) -> MemoryEstimate:
    """Peak bytes of one training step of `model` (adapter already attached) at this configuration."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_state=optimizer_state_bytes(model, optimizer),
        activations=activation_bytes(model, micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision),
    )
