"""MoRA (Jiang et al. 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", arXiv:2405.12130).

LoRA's update B·A has rank at most r. MoRA spends the same parameter budget on one trainable square matrix M
of side r_hat instead, and wraps it between a parameter-free compression of the input (d_in -> r_hat) and
decompression of the output (r_hat -> d_out): the layer computes base(x) + decompress(M · compress(x)).
The update's rank can then reach r_hat (or more), well above r. M starts at zero, so an adapted model
starts out computing exactly what its base model computes.

Design decisions (the paper leaves them open or ties them to its own shapes):

* Size. r_hat = floor(sqrt((d_in + d_out) * r)): the largest square whose parameter count does not exceed
  LoRA's (d_in + d_out) * r (the paper rounds to nearest; flooring keeps MoRA within LoRA's budget). It is
  capped at min(d_in, d_out), beyond which a bigger M adds parameters but no rank, and it is the same for
  every compression type.
* One block scheme for all compressions. The input is zero-padded to n_in = ceil(d_in / r_hat) blocks of
  r_hat; the compression reduces them to m blocks, M acts on each block, and the decompression lays m
  blocks out over the n_out = ceil(d_out / r_hat) output blocks, cut to d_out:
  - "truncation": keep the first r_hat inputs; write the first r_hat outputs, zeros elsewhere (m = 1).
  - "sharing": sum input block-wise, i.e. input j feeds group j mod r_hat; output j reads group j mod r_hat
    (m = 1). The update is M tiled over the weight: delta[o, i] = M[o mod r_hat, i mod r_hat].
  - "decoupling": every block keeps its own identity, m = min(n_in, n_out). Input block a feeds slot
    a mod m (more input blocks than output blocks: they fold by summing); output block b reads slot b mod m
    (more output blocks: the slots repeat). For a square layer the update is block-diagonal diag(M, ..., M).
  - "rotation": decoupling, but each input block a is first rotated RoPE-style by the angle a·theta_j
    (theta_j = 10000^(-2j/r_hat), pairs (j, j + r_hat/2); an odd last coordinate stays put), so the blocks
    of the update are M·R_a and differ from one another, which is what the paper adds to decoupling.
* Default compression: "rotation". The paper (Sec. 3.2 and its reference setup) uses rotation for small
  ranks like r = 8, the range this project searches, and sharing for large ranks (r = 256), where the many
  small blocks of decoupling cost more compute.
* Merging pushes the identity basis through compress -> M -> decompress (in float64) to get the dense
  delta W and adds it to the base weight; the wrapper is then replaced by its base layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import TARGET_SETS, modules_for_roles, target_modules

COMPRESSIONS = ("truncation", "sharing", "decoupling", "rotation")
ROPE_BASE = 10000.0


def square_side(d_in: int, d_out: int, r: int) -> int:
    """r_hat: the side of M within LoRA rank `r`'s parameter count (d_in + d_out) * r, <= min(d_in, d_out)."""
    if r < 1:
        raise ValueError(f"mora: r must be >= 1, got {r}")
    return max(1, min(math.isqrt((d_in + d_out) * r), d_in, d_out))


def _shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a Linear (weight: out x in) or a GPT-2 Conv1D (weight: in x out)."""
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return int(layer.in_features), int(layer.out_features)


def _rope_tables(blocks: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the angle a·theta_j for block a (rows) and coordinate (columns), rotate-half layout."""
    half = side // 2
    theta = ROPE_BASE ** (-2.0 * torch.arange(half, dtype=torch.float64) / side)
    angles = torch.arange(blocks, dtype=torch.float64)[:, None] * theta[None, :]
    cos, sin = torch.ones(blocks, side, dtype=torch.float64), torch.zeros(blocks, side, dtype=torch.float64)
    cos[:, :half], cos[:, half:2 * half] = angles.cos(), angles.cos()
    sin[:, :half], sin[:, half:2 * half] = angles.sin(), angles.sin()
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2, rest) -> (-x2, x1, 0): paired with cos/sin it rotates each pair (j, j + half)."""
    half = x.shape[-1] // 2
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([-x2, x1, torch.zeros_like(rest)], dim=-1)


class MoRALayer(nn.Module):
    """A frozen Linear/Conv1D plus MoRA's trainable square `mora_M`: base(x) + decompress(M compress(x))."""

    def __init__(self, base_layer: nn.Module, r: int, compression: str) -> None:
        super().__init__()
        _check_compression(compression)
        self.base_layer = base_layer
        self.compression = compression
        self.d_in, self.d_out = _shape(base_layer)
        self.side = square_side(self.d_in, self.d_out, r)
        self.n_in = -(-self.d_in // self.side)
        self.n_out = -(-self.d_out // self.side)
        decoupled = compression in ("decoupling", "rotation")
        self.slots = min(self.n_in, self.n_out) if decoupled else 1
        weight = base_layer.weight
        zeros = torch.zeros(self.side, self.side, dtype=weight.dtype, device=weight.device)
        self.mora_M = nn.Parameter(zeros)  # zero: the adapted model starts out as its base model, exactly
        if compression == "rotation":  # derived from the shapes: not saved, rebuilt identically on reload
            cos, sin = _rope_tables(self.n_in, self.side)
            self.register_buffer("rope_cos", cos.to(weight.device, weight.dtype), persistent=False)
            self.register_buffer("rope_sin", sin.to(weight.device, weight.dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # code that reads e.g. `c_attn.weight.dtype` still works
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., slots, side)."""
        if self.compression == "truncation":
            return x[..., None, :self.side]
        blocks = F.pad(x, (0, self.n_in * self.side - self.d_in)).unflatten(-1, (self.n_in, self.side))
        if self.compression == "rotation":
            cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
            blocks = blocks * cos + _rotate_half(blocks) * sin
        folds = -(-self.n_in // self.slots)  # input blocks per slot; zero blocks fill the last fold
        blocks = F.pad(blocks, (0, 0, 0, folds * self.slots - self.n_in))
        return blocks.unflatten(-2, (folds, self.slots)).sum(dim=-3)

    def decompress(self, y: torch.Tensor) -> torch.Tensor:
        """(..., slots, side) -> (..., d_out)."""
        if self.compression == "truncation":
            return F.pad(y.flatten(-2), (0, self.d_out - self.side))
        repeats = -(-self.n_out // self.slots)
        tiled = y.repeat(*([1] * (y.dim() - 2)), repeats, 1)
        return tiled.flatten(-2)[..., :self.d_out]

    def delta(self, x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """MoRA's update applied to `x` (in `matrix`'s dtype; `matrix` defaults to mora_M)."""
        matrix = self.mora_M if matrix is None else matrix
        return self.decompress(self.compress(x.to(matrix.dtype)) @ matrix.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out + self.delta(x).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update, (d_out, d_in) like a Linear weight: the identity pushed through, in float64."""
        basis = torch.eye(self.d_in, dtype=torch.float64, device=self.mora_M.device)
        return self.delta(basis, self.mora_M.double()).T

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update added to its weight."""
        delta = self.delta_weight()
        weight = self.base_layer.weight
        weight.add_((delta.T if isinstance(self.base_layer, Conv1D) else delta).to(weight.dtype))
        return self.base_layer


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"mora: compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def _is_supported_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _unsupported(name: str, layer: nn.Module) -> str:
    return f"mora wraps only nn.Linear and GPT-2 Conv1D layers; {name} is a {type(layer).__name__}"


def supports(model: nn.Module) -> str | None:
    roles = TARGET_SETS["all_linear"]
    odd = [n for n in modules_for_roles(model, roles) if not _is_supported_layer(model.get_submodule(n))]
    if odd:
        return _unsupported(odd[0], model.get_submodule(odd[0]))
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    r, compression = int(params["r"]), params["compression"]
    _check_compression(compression)
    if params["target_modules"] not in TARGET_SETS:
        raise ValueError(f"mora: target_modules must be one of {', '.join(TARGET_SETS)}, "
                         f"got {params['target_modules']!r}")
    from autopeft.adapter_io import freeze_base  # adapter_io imports the method registry: import late

    targets = {name: model.get_submodule(name) for name in target_modules(model, params["target_modules"])}
    for name, layer in targets.items():  # all checked before the model is touched
        if not _is_supported_layer(layer):
            raise ValueError(_unsupported(name, layer))
    freeze_base(model, context.task_type)
    for name, layer in targets.items():
        _set_submodule(model, name, MoRALayer(layer, r, compression))
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every MoRA update into its base weight and put the base layers back in place."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, MoRALayer)]
    for name, layer in wrapped:
        _set_submodule(model, name, layer.merged())
    return model


register(Method(
    name="mora",
    summary="High-rank square update M between parameter-free compress/decompress maps, LoRA's budget (own).",
    params={
        "r": ParamSpec("int", 8, "the LoRA rank whose parameter count M matches: "
                       "M's side is floor(sqrt((d_in + d_out) * r)), at most min(d_in, d_out)", low=1, high=1024),
        "target_modules": ParamSpec("choice", "qv", "which linear layers get an update",
                                    choices=tuple(TARGET_SETS)),
        "compression": ParamSpec("choice", "rotation", "how inputs are compressed to M's side and outputs "
                                 "decompressed (paper: rotation for small r, sharing for large r)",
                                 choices=COMPRESSIONS),
    },
    apply=apply,
    peft_backed=False,
    can_merge=True,
    notes="Our own implementation (peft has no MoRA); M starts at zero, so training starts from the base.",
    supports=supports,
    merge=merge,
))
