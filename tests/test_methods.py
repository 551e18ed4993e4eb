"""A CASES table per method, on the tiny BERT: the adapter attaches, only it trains, and it changes outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopeft import methods
from autopeft.methods import Method, ParamSpec
from autopeft.models import load_classifier

CASES = [
    ("lora", {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "qv", "use_rslora": False}),
    ("lora", {"r": 2, "alpha": 4.0, "dropout": 0.1, "target_modules": "all_linear", "use_rslora": True}),
    ("ia3", {"target_modules": "kv"}),
    ("ia3", {"target_modules": "kv_ffn"}),
    ("dora", {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "attention", "use_rslora": False}),
    ("prompt", {"num_virtual_tokens": 5, "init": "random"}),
    ("prompt", {"num_virtual_tokens": 8, "init": "text"}),
]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_method_attaches_and_trains_only_the_adapter(tiny_bert: Path, name: str, params: dict) -> None:
    model, _ = load_classifier(str(tiny_bert), 2, seed=0)
    total = sum(p.numel() for p in model.parameters())
    adapted = methods.get(name).apply(model, params, "SEQ_CLS")
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in adapted.parameters() if p.requires_grad) < 0.2 * total
    assert all(any(part in n for part in ("lora_", "ia3_", "classifier", "prompt_encoder")) for n in trainable)
    x = torch.randint(1000, 2000, (2, 7))
    loss = adapted(input_ids=x, attention_mask=torch.ones_like(x)).logits.sum()
    loss.backward()
    assert all(p.grad is not None for p in adapted.parameters() if p.requires_grad)


def test_lora_target_sets_resolve_to_the_named_layers(tiny_bert: Path) -> None:
    model, _ = load_classifier(str(tiny_bert), 2, seed=0)
    adapted = methods.get("lora").apply(model, methods.get("lora").resolve({"target_modules": "qv"}), "SEQ_CLS")
    wrapped = {n.rsplit(".", 1)[0] for n, _ in adapted.named_parameters() if "lora_A" in n}
    assert {w.split("encoder.")[1].rsplit(".lora_A", 1)[0] for w in wrapped} == {
        f"layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")}


def test_registry_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(Method("lora", "again", {}, lambda m, p, t: m, True, True))


@pytest.mark.parametrize(("spec", "value", "ok"), [
    (ParamSpec("int", 8, "", low=1), 0, False), (ParamSpec("int", 8, "", low=1), 4, True),
    (ParamSpec("int", 8, "", low=1), 2.5, False), (ParamSpec("bool", False, ""), "yes", False),
    (ParamSpec("choice", "a", "", choices=("a", "b")), "c", False)])
def test_param_spec_check(spec: ParamSpec, value: object, ok: bool) -> None:
    assert (spec.check(value) is None) == ok
