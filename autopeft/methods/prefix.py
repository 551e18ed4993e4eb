"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): every
self-attention layer gets `num_virtual_tokens` trainable key and value vectors that the real tokens attend
to, in front of their own keys and values. The base model is untouched and nothing merges into it.

Why our own implementation, on all three layouts: peft 0.21.2's PrefixTuningConfig injects the prefix as
the model's `past_key_values`. Under transformers 5.24 that fails with "Model does not support past key
values" for sequence classification on the tiny BERT, Llama and GPT-2 alike (their *ForSequenceClassification
forwards take no cache); it runs only for Llama/GPT-2 causal LMs. One implementation for every layout and
task keeps save/reload uniform (adapter_io saves the trainable tensors and re-applies this method).

How the prefix gets in: a forward pre-hook on each layer's self-attention module (BERT `attention.self`,
Llama `self_attn`, GPT-2 `attn`: the parent of the key projection, or of the fused `c_attn`) hands the
module a stand-in key/value cache. Each of these modules passes its freshly projected keys and values
(for Llama after the rotary embedding, for GPT-2 after splitting `c_attn`) through `cache.update(...)`
right before attention; ours returns them with the prefix concatenated in front along the sequence axis
(after delegating to a real cache, when the model brought one, so generation keeps working). The hook also
prepends "visible" columns to the layer's 4-D attention mask (boolean or additive), and builds the causal
mask when SDPA would otherwise rely on `is_causal` (which aligns top-left and would hide the prefix).
So:
- only the keys grow (queries do not), so every output keeps the input's sequence length, and hidden
  states and logits line up with the input (the forgetting probe and causal-LM loss rely on this);
- padding stays masked exactly as in the base model, whichever side it is on;
- the inputs keep their own positions, as in the base. With absolute positions (BERT, GPT-2) the prefix
  has none. With rotary positions (Llama) each row's prefix keys are rotated to the position of the row's
  first real token: rotary scores depend only on distances, which is why the base ignores how far a row is
  left-padded, and a prefix without a position would break that (a query's score against it would depend
  on the query's absolute position, so on the padding). Tested: a row alone and padded in a batch agree;
- grouped-query attention needs nothing special: the prefix has one key/value per *key/value* head, and the
  attention function repeats them for the query heads like the real keys.

Parameters, per layer and key/value: P x kv_heads x head_dim, for P = `num_virtual_tokens`. With
`reparameterize` (the paper's setting: it found optimising the prefix directly unstable), the prefix is
MLP(E): E is a P x `hidden` embedding, the MLP is Linear(hidden, hidden) -> tanh -> Linear(hidden, all
layers' keys and values). Decision: the MLP is kept after training and saved with the adapter (reload
re-applies the method and loads every trainable tensor, so logits are identical); folding it into a plain
prefix for deployment would change the adapter's structure, which adapter_io's reload-by-reapplying
cannot express. Trainable count: direct P*O; reparameterized P*h + h*h + h + h*O + O, with
O = layers * 2 * kv_heads * head_dim and h = `hidden`.

Decision, the MLP's parameterization (`PrefixMLP`): its weights are used divided by `hidden` (stored
larger to compensate), so an Adam step moves its outputs about as far as it moves a directly stored prefix
and one learning-rate range suits both forms. With standard nn.Linear weights one step moves the outputs
~hidden/2 times further; that MLP never left the majority class on MiniLM-L6 (below) at learning rates
1e-4, 3e-4 and 1e-3, and in two search trials (1000 validation rows) at 4e-3 and 1.9e-2 it also wrecked
the representations (forgetting 0.9). The paper trains at 5e-5 for epochs; a budgeted search has a few
hundred steps.

Initialisation (decision): the scale of keys and values differs between models and layers (key/value std
about 1.0-1.4 / 0.5-0.8 in MiniLM-L6, about 1 in the tiny test models at init 0.2 and about 3 at 0.5). At
apply time one forward pass of the frozen base on 32 fixed random token ids measures each layer's key and
value std. The initial values are random at the value scale; the initial keys at a tenth of the key scale
(`KEY_INIT_SCALE`), so that the prefix starts with little attention and changes outputs little (direct:
N(0, 1) entries scaled; reparameterized: the MLP's output weights scaled). Why: keys at full scale wreck a
decoder before any training. SmolLM2-135M's perplexity on two plain sentences is 14.5; with 16 prefix
tokens at full scale it was 648,181 (after 10 training steps on Rotten Tomatoes, the perplexity probe read
4,573x the base); keys at 0.1 give 42 (0.3: 100; keys and values both at 0.1: 56). Initialising from the
activations of real tokens, as the paper suggests, learned no better on MiniLM-L6 (71.8% against 74.0% at
3e-2, full-scale init). The small keys learn slowly where a model's own attention logits are large: the
tiny random GPT-2 causal LM needs the learning rate the harness gives prompt tuning (3x).

Measured with the full-scale init on MiniLM-L6 and Rotten Tomatoes (4000 train / 400 validation rows, 150
steps of 16, 10 virtual tokens; validation majority 57.8%, the classification head alone 59.8%): direct
74.0% at learning rate 3e-2 and 77.8% at 1e-1 (46,850 trainable parameters with the head);
reparameterized (hidden 128) 76.5% at 3e-2 and 74.3% at 1e-1 (612,994). Both want learning rates of 1e-2
to 1e-1, like prompt tuning. With the current init: experiments/methods/results.md.

Defaults (decisions): 20 virtual tokens (the issue); `reparameterize` false: about as accurate as the
MLP above with 13x fewer parameters. `hidden` 128: the paper used 512, but on MiniLM-L6 (O = 4608) that
MLP alone would be 2.4M parameters, ~10% of the model; 128 keeps it near 0.6M. Supported attention
implementations: eager and SDPA (the mask formats we extend); flash and flex attention are refused with a
reason.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autopeft.methods import Method, MethodContext, ParamSpec, register
from autopeft.models import modules_for_roles

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # the mask formats `_extend_mask` understands
# The initial prefix keys are this fraction of the base model's key scale (values: the full scale); see
# "Initialisation" in the module docstring.
KEY_INIT_SCALE = 0.1
ENCODER_NAME = "prefix_encoder"  # attribute on the model; its tensors are named "prefix_encoder.*"
_LAYER_ATTR = "autopeft_prefix_layer"  # on each hooked attention module: its index into the prefix


class PrefixMLP(nn.Module):
    """Linear(hidden, hidden) -> tanh -> Linear(hidden, width), with each weight stored sqrt(hidden) times
    larger than usual and used divided by `hidden` (a muP-style multiplier). The function class is the
    usual MLP's; what changes is Adam's step: it moves every weight by about the learning rate, so with
    standard weights one step moves each output by ~lr * hidden * |activation|, far further than the same
    step moves a directly stored prefix. Divided by `hidden`, an output moves by ~lr."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.size = hidden
        # N(0, hidden) weights: the pre-activations and outputs start with std ~1 and ~0.6
        self.hidden_weight = nn.Parameter(torch.randn(hidden, hidden) * hidden ** 0.5)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.out_weight = nn.Parameter(torch.randn(width, hidden) * hidden ** 0.5)
        self.out_bias = nn.Parameter(torch.zeros(width))

    def forward(self, embedding: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The output columns `rows` (one layer's keys and values, or all) for each embedding row."""
        inner = torch.tanh(F.linear(embedding, self.hidden_weight) / self.size + self.hidden_bias)
        return F.linear(inner, self.out_weight[rows]) / self.size + self.out_bias[rows]


class PrefixEncoder(nn.Module):
    """Every layer's prefix keys and values, either stored directly or produced by an MLP (see module doc)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, num_tokens: int, reparameterize: bool,
                 hidden: int) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim, self.num_tokens = layers, kv_heads, head_dim, num_tokens
        width = layers * 2 * kv_heads * head_dim
        if reparameterize:
            self.embedding = nn.Parameter(torch.randn(num_tokens, hidden))  # N(0, 1), like an nn.Embedding
            self.mlp = PrefixMLP(hidden, width)
        else:
            self.embedding = nn.Parameter(torch.randn(num_tokens, width))
            self.mlp = None
        self.rotary: list[nn.Module] = []  # the model's rotary embedding, when it has one (not a submodule)

    @torch.no_grad()
    def match_scale(self, scale: torch.Tensor) -> None:
        """Rescale the initial prefix so that each layer's keys and values have the standard deviation
        `scale[layer, 0 or 1]` (the base model's own, from `activation_scale`). Direct: the N(0, 1) entries;
        reparameterized: the MLP's output weights."""
        if self.mlp is None:
            self.embedding.view(self.num_tokens, self.layers, 2, -1).mul_(scale[None, :, :, None])
            return
        now = self.mlp(self.embedding).view(self.num_tokens, self.layers, 2, -1).std(dim=(0, 3))
        factor = (scale / now.clamp_min(1e-12)).repeat_interleave(self.kv_heads * self.head_dim)
        self.mlp.out_weight.mul_(factor[:, None])
        self.mlp.out_bias.mul_(factor)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer `index`, each (kv_heads, num_tokens, head_dim). Computed from the
        parameters at every call (not cached per forward), so gradient checkpointing recomputes it."""
        size = 2 * self.kv_heads * self.head_dim
        rows = slice(index * size, (index + 1) * size)
        if self.mlp is None:
            flat = self.embedding[:, rows]
        else:  # only this layer's rows of the output projection: the hidden layer is cheap to repeat
            flat = self.mlp(self.embedding, rows)
        kv = flat.view(self.num_tokens, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def inject(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Forward pre-hook of an attention module: hand it the prefixed cache and the widened mask."""
        if "attention_mask" not in kwargs:
            raise RuntimeError(f"prefix: {type(module).__name__} was called without an attention_mask "
                               "keyword; this transformers version calls attention differently than expected")
        cache_name = "cache" if "cache" in kwargs or "past_key_values" not in kwargs else "past_key_values"
        real_cache, mask = kwargs.get(cache_name), kwargs["attention_mask"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        # tokens a real cache already holds (generation); this layer's update has not run yet
        past = 0 if real_cache is None else real_cache.get_seq_length(getattr(module, "layer_idx", None) or 0)
        key, value = self.layer(getattr(module, _LAYER_ATTR))
        if "position_embeddings" in kwargs:  # rotary positions (Llama layout)
            key = self.rotate_to_row_start(module, key, mask, kwargs.get("position_ids"), hidden.shape[1],
                                           past)
        kwargs[cache_name] = PrefixedCache(key, value, real_cache)
        kwargs["attention_mask"] = _extend_mask(mask, module, self.num_tokens,
                                                query_length=hidden.shape[1], past=past, device=hidden.device)
        return args, kwargs

    def rotate_to_row_start(self, module: nn.Module, key: torch.Tensor, mask: torch.Tensor | None,
                            position_ids: torch.Tensor | None, length: int, past: int) -> torch.Tensor:
        """Rotate the prefix keys of each row by the rotary position of the row's first real token.

        Rotary attention scores depend only on the distance between query and key, which is why left padding
        (transformers numbers positions 0..L-1 over pads too) does not change the base model's outputs. A
        position-free prefix key would break that: a query's score against it would depend on the query's
        absolute position, so on how much its row was padded. Placing the prefix at the row's first real
        position makes the score depend on the query's distance from the row's start only."""
        if not self.rotary:
            raise RuntimeError("prefix: the model passes rotary position embeddings but has no rotary_emb")
        rotate_half = getattr(sys.modules[type(module).__module__], "rotate_half", None)
        if rotate_half is None:
            raise RuntimeError(f"prefix: {type(module).__module__} has no rotate_half for the prefix keys")
        start = _first_real_column(mask, key.device)  # (batch or 1,): column of the first real token
        if position_ids is None:  # transformers' default: positions are the column numbers
            first = start
        else:  # positions grow by one per column; count back from the last query
            first = position_ids[:, -1] - (past + length - 1 - start)
        cos, sin = self.rotary[0](key, first[:, None].to(key.device))  # (batch, 1, head_dim)
        cos, sin = cos.unsqueeze(1).to(key.dtype), sin.unsqueeze(1).to(key.dtype)
        return key * cos + rotate_half(key) * sin  # (batch, kv_heads, P, head_dim)


def _first_real_column(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Per row, the first key column the last query may attend to: the first real token (left padding)."""
    if mask is None:  # no padding
        return torch.zeros(1, dtype=torch.long, device=device)
    last = mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return visible.int().argmax(-1).to(device)


class PrefixedCache:
    """Stands in for an attention layer's key/value cache: returns the layer's keys and values (after the
    real cache's update, when there is one) with the prefix in front along the sequence axis."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, inner: Any | None) -> None:
        self.key, self.value = key, value
        # GPT-2 with cross-attention keeps its self-attention cache inside an EncoderDecoderCache
        self.inner = getattr(inner, "self_attention_cache", inner)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:  # the real cache stores the input's keys only; the prefix is re-added
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return _prepend(self.key, key_states), _prepend(self.value, value_states)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.inner.get_seq_length(*args, **kwargs) if self.inner is not None else 0


def _prepend(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """prefix ([batch,] heads, P, dim) in front of states (batch, heads, length, dim), in their dtype."""
    prefix = prefix.to(device=states.device, dtype=states.dtype)
    if prefix.shape[-3] != states.shape[1] or prefix.shape[-1] != states.shape[-1]:
        raise RuntimeError(f"prefix: keys/values of shape {tuple(states.shape)} do not fit a prefix of "
                           f"{prefix.shape[-3]} heads x {prefix.shape[-1]} dims")
    return torch.cat([prefix.expand(states.shape[0], -1, -1, -1), states], dim=2)


def _extend_mask(mask: torch.Tensor | None, module: nn.Module, num_tokens: int, *, query_length: int,
                 past: int, device: torch.device) -> torch.Tensor | None:
    """The layer's 4-D mask with `num_tokens` visible key columns in front. SDPA gets no mask when the
    batch has no padding and relies on `is_causal`; a causal layer then needs an explicit mask."""
    if mask is None:
        if not getattr(module, "is_causal", False) or query_length == 1:
            return None  # bidirectional, or one query that sees everything: nothing is hidden
        keys = torch.arange(past + query_length, device=device)
        visible = keys[None, :] <= (past + torch.arange(query_length, device=device))[:, None]
        mask = visible.view(1, 1, query_length, -1)
        if module.config._attn_implementation != "sdpa":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    if mask.dim() != 4:
        raise RuntimeError(f"prefix: expected a 4-D attention mask, got shape {tuple(mask.shape)}")
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros  # boolean: True = attend; additive: 0
    front = fill((*mask.shape[:-1], num_tokens), dtype=mask.dtype, device=mask.device)
    return torch.cat([front, mask], dim=-1)


class _Recorder:
    """A stand-in cache that records the standard deviation of the keys and values passing through it."""

    def __init__(self, inner: Any | None, stds: list[torch.Tensor]) -> None:
        self.inner, self.stds = inner, stds

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inner is not None:
            key, value = self.inner.update(key, value, layer_idx, *args, **kwargs)
        self.stds.append(torch.stack([key.float().std(), value.float().std()]))
        return key, value


@torch.no_grad()
def activation_scale(model: nn.Module, names: list[str], length: int = 32) -> torch.Tensor:
    """(layers, 2): the standard deviation of the base model's keys and values at each attention layer, on
    `length` random token ids (a fixed generator, so this does not consume the caller's random stream)."""
    stds: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        # The recorder goes where the layer was handed its cache: transformers renamed the argument
        # (past_key_values up to 5.17 at least, cache later), and a layer ignores a name it does not read.
        name = next((n for n in ("cache", "past_key_values", "past_key_value") if n in kwargs), "cache")
        return args, {**kwargs, name: _Recorder(kwargs.get(name), stds)}

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(record, with_kwargs=True) for name in names]
    length = min(length, getattr(model.config, "max_position_embeddings", None) or length)
    ids = torch.randint(model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:
        model.eval()
        model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return torch.stack(stds)


def attention_modules(model: nn.Module) -> list[str]:
    """The self-attention modules, in layer order: the parents of the key projections (GPT-2: of c_attn)."""
    parents = {name.rsplit(".", 1)[0] for name in modules_for_roles(model, ("k",))}
    return sorted(parents, key=lambda name: [int(p) if p.isdigit() else p for p in name.split(".")])


def _geometry(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) from the config; `_prepend` checks them against the real keys."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def supports(model: nn.Module) -> str | None:
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        return (f"prefix supports {' and '.join(ATTENTION_IMPLEMENTATIONS)} attention, not "
                f"{implementation!r} (load the model with attn_implementation='sdpa')")
    return None


def check(params: dict[str, Any]) -> None:
    for name, spec in PARAMS.items():
        problem = spec.check(params[name])
        if problem:
            raise ValueError(f"prefix: {name}={params[name]!r} {problem}")


def apply(model: nn.Module, params: dict[str, Any], context: MethodContext) -> nn.Module:
    check(params)
    problem = supports(model)
    if problem:
        raise ValueError(problem)
    if hasattr(model, ENCODER_NAME):
        raise ValueError("prefix: this model already has a prefix encoder")
    from autopeft.adapter_io import freeze_base  # adapter_io imports the method registry: import late

    freeze_base(model, context.task_type)
    names = attention_modules(model)
    anchor = next(model.parameters())
    encoder = PrefixEncoder(len(names), *_geometry(model), int(params["num_virtual_tokens"]),
                            bool(params["reparameterize"]), int(params["hidden"])).to(anchor.device)
    scale = activation_scale(model, names).to(anchor.device)
    scale[:, 0] *= KEY_INIT_SCALE
    encoder.match_scale(scale)
    encoder.rotary = [module for name, module in model.named_modules() if name.endswith("rotary_emb")][:1]
    setattr(model, ENCODER_NAME, encoder)
    modules = dict(model.named_modules())
    for index, name in enumerate(names):
        setattr(modules[name], _LAYER_ATTR, index)
        # a bound method: a deep copy of the model re-binds the hook to the copy's own encoder
        modules[name].register_forward_pre_hook(encoder.inject, with_kwargs=True)
    return model


PARAMS = {
    "num_virtual_tokens": ParamSpec("int", 20, "prefix length: key/value vectors added to every attention "
                                    "layer", low=1, high=512),
    "reparameterize": ParamSpec("bool", False, "produce the prefix with an MLP from a smaller embedding "
                                "(the paper's setting; learns slowly in short budgets)"),
    "hidden": ParamSpec("int", 128, "width of the reparameterization MLP and its input embedding (used only "
                        "with reparameterize)", low=1,
                        high=8192),
}

register(Method(
    name="prefix",
    summary="Trainable key/value vectors prepended in every self-attention layer (prefix tuning, own).",
    params=PARAMS, apply=apply, peft_backed=False, can_merge=False, supports=supports,
    notes="keys grow, queries do not: outputs keep the input length; the MLP (if any) is saved",
))
