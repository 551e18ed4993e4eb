"""Stand-ins with the same memory for what cannot run on fake tensors: bitsandbytes' 8-bit AdamW and
qlora's 4-bit layers. Each substitution is named in the estimate's notes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class _AdamW8bitStandIn(torch.optim.Optimizer):
    """Holds bitsandbytes' 8-bit AdamW state, in the layout of `analytic._adamw_8bit_state`, and updates nothing
    (bitsandbytes' kernels cannot run on fake tensors; its update is in place and allocates nothing)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})
        self.code_maps: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and not self.state[param]:
                    self.state[param] = self._state(param)

    def _state(self, param: torch.Tensor, min_8bit_size: int = 4096,
               block: int = 256) -> dict[str, torch.Tensor]:
        numel, device = param.numel(), param.device
        if numel < min_8bit_size:
            return {f"state{i}": torch.zeros(numel, dtype=torch.float32, device=device) for i in (1, 2)}
        if not self.code_maps:
            self.code_maps = {f"qmap{i}": torch.zeros(256, dtype=torch.float32, device=device) for i in (1, 2)}
        blocks = -(-numel // block)
        state = {f"state{i}": torch.zeros(numel, dtype=torch.uint8, device=device) for i in (1, 2)}
        state |= {f"absmax{i}": torch.zeros(blocks, dtype=torch.float32, device=device) for i in (1, 2)}
        return state | self.code_maps


@contextlib.contextmanager
def _method_stand_ins(method: str, notes: list[str]) -> Iterator[None]:
    """qlora's 4-bit layers cannot be built on fake tensors (bitsandbytes' Params4bit refuses a fake tensor
    as its data): while the method attaches, its `quantize_layer` is replaced by `_fake_quantize_layer`."""
    if method != "qlora":
        yield
        return
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from autopeft.methods import qlora

    # The first quantization builds bitsandbytes' code map from values (impossible on fake tensors) and
    # caches it: build it here, for real (1 KiB).
    with unset_fake_temporarily():
        bnb.functional.quantize_blockwise(torch.zeros(256))
    real = qlora.quantize_layer
    qlora.quantize_layer = _fake_quantize_layer
    notes.append("qlora: the 4-bit layers are built around bitsandbytes' Params4bit (which refuses fake "
                 "tensors) but quantized by bitsandbytes and run by qlora's own layer class")
    try:
        yield
    finally:
        qlora.quantize_layer = real


def _fake_quantize_layer(layer: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """`autopeft.methods.qlora.quantize_layer` on fake tensors: bitsandbytes quantizes the weight (its ops
    have fake kernels), the result becomes qlora's own Linear4bit class, built without the constructor
    (which makes a Params4bit); the packed weight is a plain parameter carrying Params4bit's attributes,
    all that bitsandbytes, qlora and peft read of it."""
    import bitsandbytes as bnb

    from autopeft.methods import qlora

    weight, from_conv1d = qlora._dense_weight(layer)
    out_features, in_features = weight.shape
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type="nf4")
    cls = qlora.nf4_linear_class()
    quantized = cls.__new__(cls)
    nn.Module.__init__(quantized)
    quantized.in_features, quantized.out_features = in_features, out_features
    quantized.compute_dtype, quantized.compute_type_is_set = compute_dtype, True
    quantized.quant_state, quantized.quant_storage = None, torch.uint8
    quantized.support_avx512bf16_for_cpu = False
    param = nn.Parameter(packed, requires_grad=False)
    for name, value in {"quant_state": state, "blocksize": 64, "compress_statistics": double_quant,
                        "quant_type": "nf4", "quant_storage": torch.uint8, "bnb_quantized": True,
                        "module": quantized}.items():
        setattr(param, name, value)
    quantized.weight = param
    quantized.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().to(compute_dtype),
                                                                  requires_grad=False)
    setattr(quantized, qlora._FROM_CONV1D, from_conv1d)
    return quantized
