"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): the frozen base's linear
layers stored in 4-bit NormalFloat (NF4, bitsandbytes), LoRA (peft) trained in full precision beside them.

Design decisions:
- What is quantized: every linear layer of the transformer blocks (all six roles q, k, v, o, ffn_in,
  ffn_out), whatever `target_modules` LoRA gets, as in the paper, which quantizes all of the base's linear
  layers. Embeddings, norms, BERT's pooler and the classification head stay fp32; the head trains.
- In place: the search hands `apply` a deep copy of the pristine fp32 base, so each block linear is
  replaced by a bitsandbytes `Linear4bit` (nf4, `compress_statistics` = double quantization of the block
  scales, compute dtype from `compute_dtype`), quantized on the device its weights are on.
- GPT-2's Conv1D (y = x·W + b, W stored in x out) has no 4-bit counterpart, so its weight is transposed
  into a Linear first (same function), then quantized; LoRA then targets that Linear under the same name.
- On the CPU the layers compute through our own dequantization (`NF4Linear`, a Linear4bit subclass, so
  peft still wraps it with its 4-bit LoRA layer); elsewhere bitsandbytes' kernels run unchanged. Two
  bitsandbytes 0.50.2 CPU problems, both measured: (1) its native CPU dequantization indexes the block
  scales per row, so any layer whose input size is not a multiple of the 64-weight block gets wrong
  weights (a 96x32 layer: errors of 0.48 x the block's largest weight, where NF4 allows 0.15; its own
  pure-torch fallback and the flat view are right); (2) its CPU inference fast path repacks a 4-bit
  weight in place on the first eval forward, changing the frozen base mid-trial, and refuses output
  sizes not divisible by 32 (a tiny Llama's k_proj). The override dequantizes the flat view with
  bitsandbytes' own public function and runs one matmul, the same arithmetic as bitsandbytes' CPU
  training path, so training and evaluation share one numerical path.
- Biases are stored in the compute dtype up front (bitsandbytes would otherwise cast them in place on the
  first forward, changing a frozen tensor mid-training).
- Saving and reloading: peft cannot reload onto an fp32 base and reproduce the 4-bit forward, so this is
  not `peft_backed`. autopeft's own format keeps the trained tensors (LoRA and head); reloading applies
  this method to a fresh fp32 base (NF4 quantization is deterministic, so the base is the same 4 bits)
  and loads them: identical logits by construction.
- Merging: folding LoRA back into 4-bit weights and re-quantizing is lossy (the re-rounded weights differ
  from base + update). `merge` instead dequantizes every 4-bit weight to fp32 and adds the LoRA update
  there (GPT-2 layers become Conv1D again), the usual way to deploy a QLoRA model: a plain fp32 model of
  the original architecture whose logits match the adapted model's (within float rounding when the
  compute dtype is fp32; bf16 compute rounds the base product, which the fp32 merged model does not).
- bitsandbytes is imported only when the method runs, so the registry loads, and qlora states why it
  cannot run (`supports`), where bitsandbytes is not installed.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from typing import Any

import torch
from torch import nn

from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.methods.lora import LORA_PARAMS, lora_config
from autopeft.models import modules_for_roles

BLOCK_ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")  # every linear layer of a transformer block
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_FROM_CONV1D = "autopeft_from_conv1d"  # marks a Linear4bit made from a GPT-2 Conv1D (merge restores it)


def supports(model: nn.Module) -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "qlora needs the bitsandbytes package (pip install bitsandbytes) for its 4-bit weights"
    for name in modules_for_roles(model, BLOCK_ROLES):
        problem = _layer_problem(model.get_submodule(name))
        if problem:
            return f"qlora cannot quantize {name}: {problem}"
    return None


def _layer_problem(layer: nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    # Exact types: a Linear subclass (already quantized, or wrapped) may compute something else.
    if type(layer) is not nn.Linear and not isinstance(layer, Conv1D):
        return f"it is a {type(layer).__name__}, not an nn.Linear or GPT-2 Conv1D"
    if layer.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"its weights are {layer.weight.dtype}, not floating point"
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _dense_weight(layer: nn.Module) -> tuple[torch.Tensor, bool]:
    """(weight as out x in, whether it came from a Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    problem = _layer_problem(layer)
    if problem:
        raise ValueError(f"qlora cannot quantize this layer: {problem}")
    if isinstance(layer, Conv1D):
        return layer.weight.detach().t().contiguous(), True
    return layer.weight.detach(), False


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The out x in weights a Linear4bit's 4 bits stand for, in the dtype of the original weights.
    Through the flat view: bitsandbytes' native CPU kernel mis-indexes block scales for rows that are
    not whole blocks (module docstring), and every backend gets a single row right."""
    import bitsandbytes as bnb

    state = copy.copy(layer.weight.quant_state)
    state.shape = torch.Size([layer.out_features * layer.in_features])
    flat = bnb.functional.dequantize_4bit(layer.weight.data, quant_state=state)
    return flat.reshape(layer.out_features, layer.in_features)


@functools.cache
def nf4_linear_class() -> type[nn.Module]:
    """`NF4Linear`, made on first use: bitsandbytes is optional (module docstring)."""
    import bitsandbytes as bnb

    class NF4Linear(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit, computing on the CPU as dequantize-then-matmul (module docstring)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type != "cpu":
                return super().forward(x)
            weight = dequantized_weight(self).to(self.compute_dtype)  # uint8 source: no gradient to it
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            return nn.functional.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)

    return NF4Linear


def quantize_layer(layer: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes NF4 Linear4bit computing what `layer` (nn.Linear or Conv1D) computes, frozen."""
    import bitsandbytes as bnb

    weight, from_conv1d = _dense_weight(layer)
    out_features, in_features = weight.shape
    quantized = nf4_linear_class()(in_features, out_features, bias=layer.bias is not None,
                                   compute_dtype=compute_dtype, compress_statistics=double_quant,
                                   quant_type="nf4", device="meta")  # meta: no throw-away fp32 weights
    # .to(device) on an unquantized Params4bit is where bitsandbytes quantizes.
    quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                         quant_type="nf4", module=quantized).to(weight.device)
    if layer.bias is not None:
        quantized.bias = nn.Parameter(layer.bias.detach().to(compute_dtype), requires_grad=False)
    setattr(quantized, _FROM_CONV1D, from_conv1d)
    return quantized


def quantize_blocks(model: nn.Module, *, double_quant: bool, compute_dtype: torch.dtype) -> list[str]:
    """Replace every block linear of `model` by its 4-bit version, in place; returns their names."""
    names = modules_for_roles(model, BLOCK_ROLES)
    for name in names:
        _replace(model, name, quantize_layer(model.get_submodule(name), double_quant=double_quant,
                                             compute_dtype=compute_dtype))
    # transformers sets this on models it loads in 4 bits; peft reads it to wrap Linear4bit layers with its
    # 4-bit LoRA layer (which knows how to dequantize) rather than the plain one.
    model.is_loaded_in_4bit = True
    return names


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    from peft import get_peft_model

    problem = supports(model)
    if problem:
        raise ValueError(problem)
    config = lora_config(model, params, context.task_type)  # names are the same before and after quantizing
    quantize_blocks(model, double_quant=bool(params["double_quant"]),
                    compute_dtype=COMPUTE_DTYPES[params["compute_dtype"]])
    return get_peft_model(model, config)


def dequantize_layer(layer: nn.Module) -> nn.Module:
    """The fp32 nn.Linear (or Conv1D, where it came from one) that a Linear4bit's 4-bit weights stand for."""
    from transformers.pytorch_utils import Conv1D

    weight = dequantized_weight(layer).float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    if getattr(layer, _FROM_CONV1D, False):
        dense: nn.Module = Conv1D(weight.shape[0], weight.shape[1]).to(weight.device)
        dense.weight.data = weight.t().contiguous()
    else:
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
        dense.weight.data = weight
    if bias is not None:
        dense.bias.data = bias
    return dense.requires_grad_(False)


def merge(model: nn.Module) -> nn.Module:
    """A plain fp32 transformers model: each 4-bit weight dequantized, its LoRA update added in fp32."""
    import bitsandbytes as bnb
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in list(model.modules()):
        if isinstance(module, BaseTunerLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            base = module.get_base_layer()
            dense = dequantize_layer(base)
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            with torch.no_grad():
                dense.weight += delta.t() if getattr(base, _FROM_CONV1D, False) else delta
            module.base_layer = dense  # unload() below puts it in the wrapper's place
    plain = model.unload()  # LoRA wrappers -> their base layers; the head -> its trained copy
    for name, module in list(plain.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):  # quantized but not a LoRA target
            _replace(plain, name, dequantize_layer(module))
    del plain.is_loaded_in_4bit
    return plain


register(Method(
    name="qlora",
    summary="LoRA on a frozen base whose block linear layers are stored in 4-bit NF4 (bitsandbytes + peft).",
    params={
        **LORA_PARAMS,
        "double_quant": ParamSpec("bool", True, "quantize the 4-bit blocks' fp32 scales again (8-bit), as in "
                                                "QLoRA: about 0.37 bits less per weight"),
        "compute_dtype": ParamSpec("choice", "fp32", "dtype the 4-bit weights are dequantized to for matmuls "
                                                     "(bf16 is fast on GPUs; fp32 is safest on CPUs)",
                                   choices=tuple(COMPUTE_DTYPES)),
    },
    apply=apply, peft_backed=False, can_merge=True, supports=supports, merge=merge,
    notes="Saved in autopeft's format: reloading re-quantizes a fresh fp32 base. Merging dequantizes "
          "to fp32.",
))
