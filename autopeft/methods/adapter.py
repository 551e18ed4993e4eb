"""Bottleneck adapters: small down-project -> nonlinearity -> up-project networks added to each block.

Serial (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): the adapter sits after a
sublayer's output projection and refines its output, `out = h + scaling * up(act(down(h)))` with
`h = projection(x)`. Parallel (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning"): the adapter runs beside the whole sublayer and reads the sublayer's input `x`,
`out = h + scaling * up(act(down(x)))`.

Sites. `placement` picks the attention sublayer (role "o": BERT attention.output.dense, Llama o_proj,
GPT-2 attn.c_proj), the feed-forward sublayer (role "ffn_out": BERT output.dense, Llama mlp.down_proj,
GPT-2 mlp.c_proj) or both (Houlsby's two adapters per layer). Either way the adapter's output is added to
the output projection's output, i.e. before the residual connection (and, in BERT and GPT-2, before the
sublayer's output dropout, which then also applies to the adapter: a negligible difference from the
papers, and the same for both variants).

Design decisions:
- We wrap the output projection (`SerialAdapter` / `ParallelAdapter` hold it as `.base`) rather than
  rewriting each architecture's block code, so one implementation serves all three layouts. The base
  weights therefore appear under `<projection>.base.*` while the adapter is attached.
- Parallel: the sublayer's input is exactly what its first projection reads: the attention's query
  projection (role "q": BERT query, Llama q_proj, GPT-2 c_attn) and the feed-forward's input projection
  (role "ffn_in": BERT intermediate.dense, Llama gate_proj, GPT-2 c_fc). A forward pre-hook on that
  projection captures its (always positional) input, and the wrapped output projection of the same
  block consumes it. This is He et al.'s formulation (adapter input = sublayer input; in the pre-LN Llama
  and GPT-2 that is the layer-normed hidden state) without touching the block modules' keyword-argument
  signatures, which differ between architectures and transformers versions. The captured tensor is
  released as soon as it is used, so no activation outlives its forward pass, and recomputation under
  gradient checkpointing re-captures it in the same order.
- The up-projection (weight and bias) starts at zero, so attaching the adapter leaves the model's outputs
  exactly unchanged; the down-projection keeps nn.Linear's default (Kaiming-uniform) init, as in He et al.
- `scaling` defaults to 1.0 (Houlsby's serial adapter has no scale). He et al. found 4.0 best for the
  parallel adapter; one default cannot depend on `variant`, so search spaces should sample `scaling`
  (or set 4.0) when they search the parallel variant.
- Defaults: bottleneck 64 (the common size for base-sized encoders), placement "both" (Houlsby),
  variant "serial", activation "relu" (He et al.).
- Cannot merge: the nonlinearity keeps the adapter from folding into the base weights.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from autopeft import adapter_io  # a module, not its names: adapter_io imports this registry first
from autopeft.errors import ModelError
from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import modules_for_roles

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# placement -> (output-projection role that gets wrapped, role whose input is the sublayer input)
PLACEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "attention": (("o", "q"),),
    "ffn": (("ffn_out", "ffn_in"),),
    "both": (("o", "q"), ("ffn_out", "ffn_in")),
}


def features(module: nn.Module) -> tuple[int, int]:
    """(input, output) sizes of a linear layer: nn.Linear, or transformers' Conv1D (transposed weight)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"adapter: cannot wrap {type(module).__name__}; it needs nn.Linear or Conv1D")


def _factory(module: nn.Module) -> dict[str, Any]:
    """dtype and device for new layers beside `module` (float32 when its weight is not floating point)."""
    weight = module.weight
    return {"dtype": weight.dtype if weight.is_floating_point() else torch.float32, "device": weight.device}


class AdaptedProjection(nn.Module):
    """A wrapped output projection plus the bottleneck network scaling * up(act(down(.)))."""

    def __init__(self, base: nn.Module, in_features: int, bottleneck: int, activation: str,
                 scaling: float) -> None:
        super().__init__()
        self.base = base
        out_features = features(base)[1]
        factory = _factory(base)
        self.adapter_down = nn.Linear(in_features, bottleneck, **factory)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck, out_features, **factory)
        nn.init.zeros_(self.adapter_up.weight)  # zero update at start: the base model's outputs are unchanged
        nn.init.zeros_(self.adapter_up.bias)
        self.scaling = float(scaling)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """scaling * up(act(down(x))), computed in the adapter's dtype."""
        down = self.adapter_down(x.to(self.adapter_down.weight.dtype))
        return self.scaling * self.adapter_up(self.adapter_act(down))

    def extra_repr(self) -> str:
        return f"scaling={self.scaling}"


class SerialAdapter(AdaptedProjection):
    """Houlsby's adapter after the projection: h + scaling * up(act(down(h))), h = base(x)."""

    def __init__(self, base: nn.Module, bottleneck: int, activation: str = "relu",
                 scaling: float = 1.0) -> None:
        super().__init__(base, features(base)[1], bottleneck, activation, scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.bottleneck(h).to(h.dtype)


class InputTap:
    """A forward pre-hook that keeps the latest input of the module it is registered on, until taken."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("adapter: a parallel adapter ran before its sublayer's input projection "
                               "(the block does not call its input projection first)")
        value, self.value = self.value, None  # released at once: no activation outlives its forward pass
        return value


class ParallelAdapter(AdaptedProjection):
    """He et al.'s adapter beside the sublayer: base(x) + scaling * up(act(down(s))), s = the sublayer's
    input, which `tap` captured from the sublayer's input projection earlier in the same forward pass."""

    def __init__(self, base: nn.Module, tap: InputTap, in_features: int, bottleneck: int,
                 activation: str = "relu", scaling: float = 1.0) -> None:
        super().__init__(base, in_features, bottleneck, activation, scaling)
        self.tap = tap  # a plain object, not a submodule: it holds no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        return h + self.bottleneck(self.tap.take()).to(h.dtype)


def _block(name: str) -> str:
    """The transformer block a module belongs to: its name up to the last numeric component (the layer
    index in every supported layout: bert.encoder.layer.3, model.layers.3, transformer.h.3)."""
    match = re.match(r"(.*\.\d+)\.", name)
    if match is None:
        raise ModelError(f"adapter: {name} is not inside a numbered block")
    return match.group(1)


def _check(params: dict[str, Any]) -> dict[str, Any]:
    """`params` completed with defaults; clear errors for unknown names and values out of range."""
    unknown = sorted(set(params) - set(ADAPTER_PARAMS))
    if unknown:
        raise ValueError(f"adapter: unknown parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(ADAPTER_PARAMS)}")
    full = {name: params.get(name, spec.default) for name, spec in ADAPTER_PARAMS.items()}
    for name, spec in ADAPTER_PARAMS.items():
        problem = spec.check(full[name])
        if problem:
            raise ValueError(f"adapter: {name} {problem} (got {full[name]!r})")
    return full


def _wrap(model: nn.Module, name: str, wrapper: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, wrapper)


def _inject(model: nn.Module, target_role: str, source_role: str, p: dict[str, Any]) -> None:
    """Wrap every module of `target_role`; parallel adapters read the input of the same block's
    `source_role` module (the first one in name order: Llama's gate_proj and up_proj read the same input)."""
    sources: dict[str, str] = {}
    for name in modules_for_roles(model, (source_role,)):
        sources.setdefault(_block(name), name)
    for name in modules_for_roles(model, (target_role,)):
        base = model.get_submodule(name)
        if p["variant"] == "serial":
            _wrap(model, name, SerialAdapter(base, int(p["bottleneck"]), p["activation"], p["scaling"]))
            continue
        source = model.get_submodule(sources[_block(name)])
        tap = InputTap()
        source.register_forward_pre_hook(tap)
        _wrap(model, name, ParallelAdapter(base, tap, features(source)[0], int(p["bottleneck"]),
                                           p["activation"], p["scaling"]))


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    p = _check(params)
    if any(isinstance(m, AdaptedProjection) for m in model.modules()):
        raise ValueError("adapter: this model already has bottleneck adapters; apply to a fresh base model")
    problem = supports(model)
    if problem:
        raise ModelError(problem)
    adapter_io.freeze_base(model, context.task_type)
    for target_role, source_role in PLACEMENTS[p["placement"]]:
        _inject(model, target_role, source_role, p)  # new layers: requires_grad=True by default
    return model


def supports(model: nn.Module) -> str | None:
    """Every role the adapter wraps or reads must be a linear layer, one input projection per block."""
    for target_role, source_role in PLACEMENTS["both"]:
        try:
            targets = modules_for_roles(model, (target_role,))
            sources = {_block(n) for n in modules_for_roles(model, (source_role,))}
        except ModelError as exc:
            return f"adapter: {exc}"
        for name in targets + modules_for_roles(model, (source_role,)):
            module = model.get_submodule(name)
            if not isinstance(module, (nn.Linear, Conv1D)):
                return f"adapter: {name} is a {type(module).__name__}, not nn.Linear or Conv1D"
        missing = [n for n in targets if _block(n) not in sources]
        if missing:
            return f"adapter: no {source_role} projection in the block of {missing[0]}"
    return None


ADAPTER_PARAMS = {
    "bottleneck": ParamSpec("int", 64, "size of the down-projection (the adapter's hidden width)",
                            low=1, high=8192),
    "placement": ParamSpec("choice", "both", "which sublayers get an adapter: attention output, "
                           "feed-forward output or both", choices=tuple(PLACEMENTS)),
    "variant": ParamSpec("choice", "serial", "serial: after the output projection (Houlsby); parallel: "
                         "beside the sublayer, reading its input (He et al.)",
                         choices=("serial", "parallel")),
    "activation": ParamSpec("choice", "relu", "nonlinearity between down- and up-projection",
                            choices=tuple(ACTIVATIONS)),
    "scaling": ParamSpec("float", 1.0, "multiplies the adapter's output (He et al. use 4 for parallel)",
                         low=1e-6),
}

register(Method(
    name="adapter",
    summary="Bottleneck adapters up(act(down(.))) after (serial, Houlsby) or beside (parallel, He et al.) "
            "the attention and/or feed-forward sublayers.",
    params=ADAPTER_PARAMS, apply=apply, peft_backed=False, can_merge=False,
    families=("bert", "llama", "gpt2"), supports=supports,
    notes="The nonlinearity keeps the adapter from merging: it adds a small inference cost."))
