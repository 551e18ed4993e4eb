"""Bottleneck adapters (serial, Houlsby et al. 2019; parallel, He et al. 2022): the maths on tiny models.

Shapes and dtypes of the wrapped layers (nn.Linear and GPT-2's Conv1D); exact identity at start for
every placement x variant; the trainable parameter count against 2*d*b + b + d per site; the parallel
adapter reads the sublayer's input (and so differs from the serial one once trained); placement picks
exactly the o-role or ffn_out-role modules; bad parameters and unsuitable models are refused clearly.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from autopeft import adapter_io, methods
from autopeft.methods import MethodContext
from autopeft.methods.adapter import AdaptedProjection, InputTap, ParallelAdapter, SerialAdapter
from autopeft.models import load_classifier, modules_for_roles

FAMILIES = ("bert", "llama", "gpt2")
PARAMS = {"bottleneck": 4, "placement": "both", "variant": "serial", "activation": "relu", "scaling": 1.0}
ROLES = {"attention": ("o",), "ffn": ("ffn_out",), "both": ("o", "ffn_out")}


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _attach(folder: Path, **params):
    base, tokenizer = load_classifier(str(folder), 2, seed=0)
    torch.manual_seed(0)
    model = adapter_io.attach(base, "adapter", {**PARAMS, **params}, MethodContext())
    return model.eval(), tokenizer


def _adapted(model: nn.Module) -> dict[str, AdaptedProjection]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdaptedProjection)}


def _layer(name: str) -> str:
    return re.search(r"\.(\d+)\.", name).group(1)


def _train_up(model: nn.Module, seed: int = 1) -> None:
    """Give every up-projection non-zero weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in _adapted(model).values():
            up = module.adapter_up
            up.weight.copy_(torch.randn(up.weight.shape, generator=generator) * 0.5)
            up.bias.copy_(torch.randn(up.bias.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("base", [nn.Linear(8, 6), Conv1D(6, 8)], ids=["linear", "conv1d"])
def test_serial_adapter_shapes_and_identity_at_start(base: nn.Module) -> None:
    torch.manual_seed(0)
    wrapped = SerialAdapter(base, bottleneck=3, activation="gelu", scaling=2.0)
    assert wrapped.adapter_down.weight.shape == (3, 6) and wrapped.adapter_up.weight.shape == (6, 3)
    x = torch.randn(2, 5, 8)
    assert torch.equal(wrapped(x), base(x))
    with torch.no_grad():
        wrapped.adapter_up.weight.fill_(0.1)
    h = base(x)
    expected = h + 2.0 * wrapped.adapter_up(nn.functional.gelu(wrapped.adapter_down(h)))
    assert wrapped(x).shape == (2, 5, 6) and torch.allclose(wrapped(x), expected)


def test_parallel_adapter_reads_the_tapped_input_and_releases_it() -> None:
    torch.manual_seed(0)
    source, base = nn.Linear(8, 16), nn.Linear(16, 6)
    tap = InputTap()
    source.register_forward_pre_hook(tap)
    wrapped = ParallelAdapter(base, tap, in_features=8, bottleneck=3, activation="silu", scaling=4.0)
    with torch.no_grad():
        wrapped.adapter_up.weight.fill_(0.1)
    x = torch.randn(2, 5, 8)
    mid = source(x)
    out = wrapped(mid)
    expected = base(mid) + 4.0 * wrapped.adapter_up(nn.functional.silu(wrapped.adapter_down(x)))
    assert out.shape == (2, 5, 6) and torch.allclose(out, expected)
    assert tap.value is None  # no activation outlives the forward pass
    with pytest.raises(RuntimeError, match="adapter"):
        wrapped(mid)  # the sublayer's input projection did not run first


def test_adapter_layers_keep_the_base_dtype() -> None:
    wrapped = SerialAdapter(nn.Linear(8, 6).to(torch.float64), bottleneck=3)
    assert {p.dtype for p in wrapped.parameters()} == {torch.float64}
    assert wrapped(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("family", FAMILIES)
def test_attaching_leaves_the_logits_exactly_unchanged(tiny_models, family) -> None:
    base, tokenizer = load_classifier(str(tiny_models[family]), 2, seed=0)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        before = base.eval()(**inputs).logits
    for placement, variant in itertools.product(("attention", "ffn", "both"), ("serial", "parallel")):
        model, _ = _attach(tiny_models[family], placement=placement, variant=variant, scaling=4.0)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, before), f"{placement} x {variant}"


@pytest.mark.parametrize(("family", "placement", "variant"),
                         [("bert", "both", "serial"), ("llama", "ffn", "parallel"),
                          ("gpt2", "attention", "parallel"), ("gpt2", "both", "serial")])
def test_parameter_count_is_the_formula_times_the_sites(tiny_models, family, placement, variant) -> None:
    bottleneck = 5
    model, _ = _attach(tiny_models[family], bottleneck=bottleneck, placement=placement, variant=variant)
    d = model.config.hidden_size
    sites = model.config.num_hidden_layers * len(ROLES[placement])
    own = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "adapter_" in n)
    assert own == sites * (2 * d * bottleneck + bottleneck + d)
    assert len(_adapted(model)) == sites


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ("attention", "ffn", "both"))
def test_placement_adapts_exactly_its_role(tiny_models, family, placement) -> None:
    base, _ = load_classifier(str(tiny_models[family]), 2, seed=0)
    expected = set(modules_for_roles(base, ROLES[placement]))
    model, _ = _attach(tiny_models[family], placement=placement)
    assert set(_adapted(model)) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_serial_and_parallel_differ_once_trained(tiny_models, family) -> None:
    logits = {}
    for variant in ("serial", "parallel"):
        model, tokenizer = _attach(tiny_models[family], variant=variant)
        _train_up(model)
        with torch.no_grad():
            logits[variant] = model(**_inputs(tokenizer)).logits
    assert not torch.allclose(logits["serial"], logits["parallel"], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_adapter_input_is_the_sublayer_input(tiny_models, family) -> None:
    """Each wrapped projection's output minus its base output is the adapter applied to what the block's
    first projection (q for attention, ffn_in for the feed-forward) read."""
    model, tokenizer = _attach(tiny_models[family], variant="parallel", scaling=4.0)
    _train_up(model)
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, args, output: seen.__setitem__(name, args[0])

    for role in ("q", "ffn_in"):
        for name in modules_for_roles(model, (role,)):
            model.get_submodule(name).register_forward_hook(keep(name))
    checks = []
    for name, module in _adapted(model).items():
        module.register_forward_hook(lambda m, args, out, n=name: checks.append((n, m, args[0], out)))
    with torch.no_grad():
        model(**_inputs(tokenizer))
        for name, module, x, out in checks:
            role = "q" if name in modules_for_roles(model, ("o",)) else "ffn_in"
            source = next(n for n in modules_for_roles(model, (role,)) if _layer(n) == _layer(name))
            update = module.adapter_up(module.adapter_act(module.adapter_down(seen[source])))
            expected = module.base(x) + 4.0 * update
            assert torch.allclose(out, expected, atol=1e-6), name
    assert len(checks) == 2 * model.config.num_hidden_layers


def test_only_adapters_and_the_head_train(tiny_models) -> None:
    model, _ = _attach(tiny_models["gpt2"], variant="parallel")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("adapter_" in n or n.startswith("score") for n in trainable)


@pytest.mark.parametrize(("params", "match"), [
    ({"bottleneck": 0}, "bottleneck"), ({"activation": "tanh"}, "activation"),
    ({"variant": "both"}, "variant"), ({"scaling": 0.0}, "scaling"), ({"placement": "qv"}, "placement"),
    ({"rank": 4}, "unknown")])
def test_bad_parameters_are_refused_clearly(tiny_models, params, match) -> None:
    base, _ = load_classifier(str(tiny_models["bert"]), 2, seed=0)
    with pytest.raises(ValueError, match=f"adapter: .*{match}"):
        methods.get("adapter").apply(base, {**PARAMS, **params}, MethodContext())


def test_applying_twice_is_refused(tiny_models) -> None:
    model, _ = _attach(tiny_models["bert"])
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        methods.get("adapter").apply(model, PARAMS, MethodContext())


def test_a_non_linear_projection_is_reported_not_crashed(tiny_models) -> None:
    base, _ = load_classifier(str(tiny_models["bert"]), 2, seed=0)
    base.bert.encoder.layer[0].attention.output.dense = nn.Identity()
    problem = methods.get("adapter").problem(base)
    assert problem and "adapter" in problem and "Identity" in problem
