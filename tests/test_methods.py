"""The method zoo: a CASES table of methods x {tiny BERT, tiny Llama, tiny GPT-2} (2 layers, random weights).

For every case: the method attaches and only its parameters (and the classification head) train; after
training every base weight is bit-identical; loss on one fixed batch falls clearly with only the method's
parameters training; save -> reload into a fresh model gives identical logits; where the method merges,
merged and unmerged logits agree within 1e-4. Decoders also learn as causal LMs with the loss on the
answer tokens only. A method that cannot apply to an architecture must say why (and is then skipped).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests_support import train_steps

from autopeft import adapter_io, methods
from autopeft.methods import Method, MethodContext, ParamSpec
from autopeft.models import load_classifier
from autopeft.train import causal_lm_loss, classification_loss

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all_linear", "use_rslora": False}
# (method, its parameters, learning rate for the fixed-batch learning check)
CASES = [
    ("lora", LORA, 1e-2),
    ("lora", {**LORA, "target_modules": "qv", "use_rslora": True}, 1e-2),
    ("dora", {**LORA, "target_modules": "attention"}, 1e-2),
    ("qlora", {**LORA, "double_quant": True, "compute_dtype": "fp32"}, 1e-2),
    ("adalora", {"init_r": 8, "target_r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all_linear",
                 "warmup_fraction": 0.2, "final_fraction": 0.3, "update_every": 2}, 1e-2),
    ("mora", {"r": 4, "target_modules": "all_linear", "compression": "sharing"}, 1e-2),
    ("mora", {"r": 2, "target_modules": "qv", "compression": "decoupling"}, 1e-2),
    ("adapter", {"bottleneck": 8, "placement": "both", "variant": "serial", "activation": "relu",
                 "scaling": 1.0}, 1e-2),
    ("adapter", {"bottleneck": 4, "placement": "ffn", "variant": "parallel", "activation": "gelu",
                 "scaling": 4.0}, 1e-2),
    ("prefix", {"num_virtual_tokens": 4, "reparameterize": False, "hidden": 32}, 1e-1),
    ("prefix", {"num_virtual_tokens": 4, "reparameterize": True, "hidden": 32}, 1e-1),
    ("prompt", {"num_virtual_tokens": 5, "init": "random"}, 3e-2),
    ("prompt", {"num_virtual_tokens": 8, "init": "text"}, 3e-2),
    ("ia3", {"target_modules": "kv"}, 3e-2),
    ("ia3", {"target_modules": "kv_ffn"}, 3e-2),
]
# Substrings that name each method's own trainable tensors.
MARKERS = {"lora": ("lora_",), "dora": ("lora_",), "qlora": ("lora_",), "adalora": ("lora_",),
           "ia3": ("ia3_",), "prompt": ("prompt_encoder",), "prefix": ("prompt_encoder", "prefix_"),
           "mora": ("mora_",), "adapter": ("adapter_",)}
HEAD = ("classifier", "score")
FAMILIES = ("bert", "llama", "gpt2")
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["a gripping, funny film", "dull and far too long", "one of the best of the year",
             "a mess from start to finish", "warm and wise", "i want my money back", "quietly brilliant",
             "tedious"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])}


def _attach(folder: Path, name: str, params: dict, task_type: str = "SEQ_CLS", steps: int = 40):
    base, tokenizer = load_classifier(str(folder), 2, seed=0)
    method = methods.get(name) if name in methods.names() else None
    if method is None:
        pytest.skip(f"{name} is not registered yet")
    problem = method.problem(base)
    if problem:
        assert name in problem  # a stated reason, naming the method
        pytest.skip(problem)
    for param in base.parameters():
        param.requires_grad_(True)  # as the search hands it over: the method must freeze the base
    torch.manual_seed(0)  # the adapter's random init: the same whatever ran before
    return adapter_io.attach(base, name, params, MethodContext(task_type, steps)), tokenizer


@torch.no_grad()
def _eval_loss(model, batch, loss_fn=classification_loss) -> float:
    """Loss without dropout: the training losses are noisy, this is what the model has learned.
    (Causal LM: falling 1 nat on a fixed batch in 60 steps is a clear margin; classification: 25%.)"""
    model.eval()
    loss_sum, count = loss_fn(model, batch)
    return float(loss_sum / count)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("name", "params", "lr"), CASES, ids=IDS)
def test_only_the_method_trains_and_the_base_stays_bit_identical(tiny_models, family, name, params, lr) -> None:
    model, tokenizer = _attach(tiny_models[family], name, params)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    own = [n for n in trainable if any(m in n for m in MARKERS[name])]
    assert own, f"no {name} parameters are trainable"
    assert all(n in own or any(h in n for h in HEAD) for n in trainable), f"unexpected trainable: {trainable}"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, _batch(tokenizer), lr, 3, after_step=methods.get(name).after_step)
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert not changed, f"base weights changed: {changed[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("name", "params", "lr"), CASES, ids=IDS)
def test_it_learns_a_fixed_batch_and_the_method_itself_moves(tiny_models, family, name, params, lr) -> None:
    model, tokenizer = _attach(tiny_models[family], name, params)
    own = {n: p.detach().clone() for n, p in model.named_parameters()
           if p.requires_grad and any(m in n for m in MARKERS[name])}
    batch = _batch(tokenizer)
    before = _eval_loss(model, batch)
    train_steps(model, batch, lr, 40, after_step=methods.get(name).after_step)
    after = _eval_loss(model, batch)
    assert after < 0.75 * before, f"{name} on {family}: loss {before:.3f} -> {after:.3f}"
    moved = [n for n, p in model.named_parameters() if n in own and not torch.equal(p, own[n])]
    assert len(moved) >= len(own) // 2, f"the gradient did not reach {name}'s parameters"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("name", "params", "lr"), CASES, ids=IDS)
def test_save_reload_gives_identical_logits_and_merging_agrees(tiny_models, tmp_path, family, name, params,
                                                               lr) -> None:
    model, tokenizer = _attach(tiny_models[family], name, params)
    batch = _batch(tokenizer)
    train_steps(model, batch, lr, 5, after_step=methods.get(name).after_step)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    adapter_io.save(model, tmp_path / "adapter")
    fresh, _ = load_classifier(str(tiny_models[family]), 2, seed=1)  # another head init: it must be loaded too
    # A str, as an export's README writes the folder: a Path only once (TypeError for autopeft's own methods).
    reloaded = adapter_io.load(fresh, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
    if methods.get(name).can_merge:  # the reloaded one: peft's loaded adapters could not be merged
        merged = adapter_io.merge(reloaded).eval()
        with torch.no_grad():
            assert torch.allclose(merged(**inputs).logits, logits, atol=1e-4)


def test_an_adapter_saved_over_another_methods_folder_loads_as_itself(tiny_models, tmp_path) -> None:
    """`train --force` into a folder holding another adapter: our own config file, read first, was left behind
    and the folder loaded (or failed to load) as the earlier method."""
    folder = tmp_path / "adapter"
    bottleneck, _ = _attach(tiny_models["bert"], *CASES[7][:2])
    adapter_io.save(bottleneck, folder)
    lora, tokenizer = _attach(tiny_models["bert"], *CASES[0][:2])
    train_steps(lora, _batch(tokenizer), 1e-2, 3)
    adapter_io.save(lora, folder)
    inputs = {k: v for k, v in _batch(tokenizer).items() if k != "labels"}
    fresh, _ = load_classifier(str(tiny_models["bert"]), 2, seed=1)
    reloaded = adapter_io.load(fresh, folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, lora.eval()(**inputs).logits)
    assert sorted(p.name for p in folder.glob("adapter_*")) == ["adapter_config.json", "adapter_model.safetensors"]


DECODER_CASES = [case for case in CASES if case[0] in ("lora", "mora", "adapter", "prefix", "prompt")]


@pytest.mark.parametrize("family", ("llama", "gpt2"))
@pytest.mark.parametrize(("name", "params", "lr"), DECODER_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DECODER_CASES)])
def test_decoders_learn_the_answer_tokens_as_causal_lms(tiny_causal_models, family, name, params, lr) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_causal_models[family]
    if name not in methods.names():
        pytest.skip(f"{name} is not registered yet")
    base = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = adapter_io.attach(base, name, params, MethodContext("CAUSAL_LM", 40))
    prompt = tokenizer(["review : a gripping film . sentiment :"] * 2, return_tensors="pt")["input_ids"]
    answer = tokenizer(["positive", "negative"], add_special_tokens=False, return_tensors="pt")["input_ids"]
    input_ids = torch.cat([prompt, answer], dim=1)
    labels = torch.cat([torch.full_like(prompt, -100), answer], dim=1)  # loss on the answer only
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    before = _eval_loss(model, batch, causal_lm_loss)
    # virtual-token methods start with little influence on a causal LM: they need a higher rate
    train_steps(model, batch, lr * (3 if name in ("prompt", "prefix") else 1), 60, loss_fn=causal_lm_loss)
    after = _eval_loss(model, batch, causal_lm_loss)
    assert after < before - 1.0, f"{name} on {family}: loss {before:.3f} -> {after:.3f}"


def test_lora_target_sets_resolve_to_the_named_layers(tiny_models) -> None:
    model, _ = _attach(tiny_models["bert"], "lora", {**LORA, "target_modules": "qv"})
    wrapped = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {w.split("encoder.")[1].rsplit(".lora_A", 1)[0] for w in wrapped} == {
        f"layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")}


def test_an_unseen_model_type_with_standard_blocks_is_discovered(tiny_models) -> None:
    base, _ = load_classifier(str(tiny_models["llama"]), 2, seed=0)
    base.config.model_type = "never-seen-before"  # discovery reads module names, not the model type
    model = adapter_io.attach(base, "lora", LORA, MethodContext())
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2 * 7


def test_registry_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(Method("lora", "again", {}, lambda m, p, c: m, True, True))


@pytest.mark.parametrize(("spec", "value", "ok"), [
    (ParamSpec("int", 8, "", low=1), 0, False), (ParamSpec("int", 8, "", low=1), 4, True),
    (ParamSpec("int", 8, "", low=1), 2.5, False), (ParamSpec("bool", False, ""), "yes", False),
    (ParamSpec("choice", "a", "", choices=("a", "b")), "c", False)])
def test_param_spec_check(spec: ParamSpec, value: object, ok: bool) -> None:
    assert (spec.check(value) is None) == ok


def test_every_registered_method_has_a_case_on_every_family() -> None:
    assert set(methods.names()) <= {name for name, _, _ in CASES}
    assert MARKERS.keys() >= set(methods.names())


def test_the_registry_export_and_report_load_without_peft() -> None:
    """peft takes seconds to import: commands that build no adapter (export's checks, report, methods, a bad
    option) must not pay for it, so the method modules import it only where they build one."""
    import subprocess
    import sys

    code = ("import sys, autopeft.methods, autopeft.export, autopeft.report, autopeft.cli; "
            "assert len(autopeft.methods.names()) >= 9; print('peft' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
