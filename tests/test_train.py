"""The training loop: exact gradient accumulation, optimizers that learn, non-finite losses that fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from autopeft import methods
from autopeft.data import TokenizedSplit, collate
from autopeft.errors import TrialFailed
from autopeft.methods import MethodContext
from autopeft.models import load_classifier
from autopeft.train import TrainSettings, classification_loss, fit


@pytest.fixture()
def lora_model(tiny_bert: Path) -> torch.nn.Module:
    model, _ = load_classifier(str(tiny_bert), 2, seed=0)
    params = methods.get("lora").resolve({"r": 4, "target_modules": "all_linear"})
    return methods.get("lora").apply(model, params, MethodContext())


def variable_length_split(n: int = 16, seed: int = 0) -> TokenizedSplit:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=gen).tolist()
    labels = torch.randint(0, 2, (n,), generator=gen)
    # Learnable: each class draws its tokens from its own range of the vocabulary.
    ids = [torch.randint(1000 + 2000 * int(y), 2000 + 2000 * int(y), (length,), generator=gen).tolist()
           for length, y in zip(lengths, labels)]
    return TokenizedSplit(ids, labels)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_give_the_full_batch_gradient(lora_model: torch.nn.Module) -> None:
    """k micro-batches of b padded rows == one batch of k*b rows, normalised over all targets (fp32)."""
    torch.manual_seed(0)
    for p in lora_model.parameters():  # LoRA B starts at zero; give every adapter weight a gradient path
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    lora_model.eval()  # no dropout, so both passes compute the same function
    split = variable_length_split()
    full = copy.deepcopy(lora_model)
    loss_sum, n = classification_loss(full, collate(split, list(range(16)), 0))
    (loss_sum / n).backward()
    micro_batches = [collate(split, list(range(i, i + 4)), 0) for i in range(0, 16, 4)]
    total = sum(len(b["labels"]) for b in micro_batches)
    for batch in micro_batches:  # the same normalisation train.fit applies
        loss_sum, _ = classification_loss(lora_model, batch)
        (loss_sum / total).backward()
    expected, got = grads(full), grads(lora_model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def one_sgd_step_delta(model: torch.nn.Module, split: TokenizedSplit, *, micro: int, accum: int) -> dict[str, torch.Tensor]:
    """Parameter change of one plain-SGD step with lr 1 through train.fit: exactly minus the gradient."""
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = TrainSettings(learning_rate=1.0, optimizer="sgd", momentum=0.0, micro_batch_size=micro,
                             grad_accum_steps=accum, max_steps=1, max_grad_norm=0.0, scheduler="constant")
    fit(model, split, settings, pad_id=0, loss_fn=_deterministic_loss)
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def _deterministic_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    model.eval()  # fit() switches to train mode; dropout would make the two runs differ
    return classification_loss(model, batch)


def test_fit_accumulates_exactly_over_unequal_padded_micro_batches(lora_model: torch.nn.Module) -> None:
    """One epoch of 16 rows in one step: 4 micro-batches of 4 (each padded to its own length, the last
    one smaller when rows don't divide) give the same update as one batch of 16, within 1e-5 (fp32)."""
    torch.manual_seed(0)
    for p in lora_model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    split = variable_length_split(14)  # 14 rows: micro-batches of 4, 4, 4 and 2 targets
    full = one_sgd_step_delta(lora_model, split, micro=14, accum=1)
    accumulated = one_sgd_step_delta(lora_model, split, micro=4, accum=4)
    for name, delta in full.items():
        assert delta.abs().sum() > 0
        torch.testing.assert_close(accumulated[name], delta, atol=1e-5, rtol=1e-5)


def test_fp16_overflow_skips_the_step_lowers_the_scale_and_training_goes_on(lora_model: torch.nn.Module) -> None:
    calls = {"n": 0}

    def overflow_first_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, n = classification_loss(model, batch)
        calls["n"] += 1
        # A finite loss whose scaled gradient (x 2^16) is inf: the overflow GradScaler exists to catch.
        return (loss * 1e36 if calls["n"] == 1 else loss), n

    split = variable_length_split(32)
    settings = TrainSettings(learning_rate=1e-2, precision="fp16", micro_batch_size=8, max_steps=6)
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    result = fit(lora_model, split, settings, pad_id=0, loss_fn=overflow_first_step)
    assert result.overflow_steps == 1
    assert result.final_loss_scale == 2.0**15  # halved once, not grown back within 2000 steps
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    after = dict(lora_model.named_parameters())
    assert all(torch.isfinite(after[n]).all() for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before)  # later steps did update


def test_a_step_the_loss_scaler_skipped_hands_the_methods_step_hook_finite_gradients(
        lora_model: torch.nn.Module) -> None:
    """AdaLoRA's hook scores rank importance from p.grad: an overflowed step's inf gradient made its scores NaN,
    and it pruned no rank for the rest of the trial. The hook still runs that step: its schedule fixes the final
    ranks at one step, and skipping that step crashed the next."""
    calls, seen = {"n": 0}, []

    def overflow_first_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, n = classification_loss(model, batch)
        calls["n"] += 1
        return (loss * 1e36 if calls["n"] == 1 else loss), n

    def hook(model: torch.nn.Module, step: int) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.append((step, bool(grads) and all(torch.isfinite(g).all() for g in grads)))

    settings = TrainSettings(learning_rate=1e-2, precision="fp16", micro_batch_size=8, max_steps=4)
    result = fit(lora_model, variable_length_split(32), settings, pad_id=0, loss_fn=overflow_first_step,
                 after_step=hook)
    assert result.overflow_steps == 1
    assert seen == [(1, True), (2, True), (3, True), (4, True)]


def test_a_fp16_run_whose_every_step_overflowed_fails_instead_of_passing_as_trained(
        lora_model: torch.nn.Module) -> None:
    def always_overflow(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, n = classification_loss(model, batch)
        return loss * 1e36, n

    settings = TrainSettings(learning_rate=1e-2, precision="fp16", micro_batch_size=8, max_steps=3)
    with pytest.raises(TrialFailed, match="skipped all 3 optimizer steps"):
        fit(lora_model, variable_length_split(32), settings, pad_id=0, loss_fn=always_overflow)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd", "adamw_8bit"])
def test_optimizer_state_matches_the_memory_estimate(lora_model: torch.nn.Module, optimizer: str) -> None:
    from autopeft.memory import optimizer_state_bytes
    from autopeft.train import build_optimizer

    params = [p for p in lora_model.parameters() if p.requires_grad]
    opt = build_optimizer(params, TrainSettings(learning_rate=1e-3, optimizer=optimizer))
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v))  # the scalar step counters too: they are allocated
    assert state == optimizer_state_bytes(lora_model, optimizer)


def test_adafactor_and_8bit_state_are_smaller_than_adamw_on_a_matrix() -> None:
    from autopeft.memory import optimizer_state_bytes

    layer = torch.nn.Linear(384, 384, bias=False)
    assert optimizer_state_bytes(layer, "adafactor") * 100 < optimizer_state_bytes(layer, "adamw")
    assert optimizer_state_bytes(layer, "adamw_8bit") * 3.5 < optimizer_state_bytes(layer, "adamw")


def test_8bit_state_size_on_a_large_matrix_matches_bitsandbytes() -> None:
    pytest.importorskip("bitsandbytes")
    from autopeft.memory import optimizer_state_bytes
    from autopeft.train import build_optimizer

    layer = torch.nn.Linear(384, 384, bias=False)  # 147,456 weights: above bitsandbytes' 8-bit threshold
    opt = build_optimizer(list(layer.parameters()), TrainSettings(learning_rate=1e-3, optimizer="adamw_8bit"))
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()
    state = sum(v.numel() * v.element_size() for v in opt.state[layer.weight].values() if torch.is_tensor(v) and v.dim() > 0)
    assert state == optimizer_state_bytes(layer, "adamw_8bit")


def test_an_unavailable_optimizer_fails_the_trial_with_its_reason(lora_model: torch.nn.Module,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TrialFailed, match="adamw_8bit needs the bitsandbytes package"):
        fit(lora_model, variable_length_split(), TrainSettings(learning_rate=1e-3, optimizer="adamw_8bit"), pad_id=0)


def test_gradient_checkpointing_gives_the_same_update(lora_model: torch.nn.Module) -> None:
    split = variable_length_split(16)
    settings = {"learning_rate": 1e-2, "micro_batch_size": 8, "max_steps": 2, "seed": 0}
    plain, checkpointed = copy.deepcopy(lora_model), copy.deepcopy(lora_model)
    torch.manual_seed(0)
    fit(plain, split, TrainSettings(**settings), pad_id=0, loss_fn=_deterministic_loss)
    torch.manual_seed(0)
    fit(checkpointed, split, TrainSettings(**settings, gradient_checkpointing=True), pad_id=0,
        loss_fn=_deterministic_loss)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "sgd", "adamw_8bit"])
def test_each_optimizer_lowers_the_loss(lora_model: torch.nn.Module, optimizer: str) -> None:
    split = variable_length_split(64, seed=1)
    lr = 0.2 if optimizer == "sgd" else 1e-2
    settings = TrainSettings(learning_rate=lr, optimizer=optimizer, micro_batch_size=16, max_steps=40,
                             warmup_ratio=0.0, scheduler="constant")
    result = fit(lora_model, split, settings, pad_id=0)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first
    assert len(result.losses) == 40 and result.tokens == sum(split.lengths()) * 40 * 16 // 64


def test_a_non_finite_loss_fails_the_trial_with_its_reason(lora_model: torch.nn.Module) -> None:
    def poisoned(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, n = classification_loss(model, batch)
        return loss * float("nan"), n

    with pytest.raises(TrialFailed, match="non-finite loss"):
        fit(lora_model, variable_length_split(), TrainSettings(learning_rate=1e-3, max_steps=2), pad_id=0,
            loss_fn=poisoned)


def test_training_is_reproducible_for_a_seed(tiny_bert: Path) -> None:
    losses = []
    for _ in range(2):
        model, _ = load_classifier(str(tiny_bert), 2, seed=0)
        model = methods.get("lora").apply(model, methods.get("lora").resolve({}), MethodContext())
        torch.manual_seed(3)
        losses.append(fit(model, variable_length_split(32), TrainSettings(learning_rate=1e-3, max_steps=5, seed=3),
                          pad_id=0).losses)
    assert losses[0] == losses[1]


def test_a_precision_the_device_cannot_run_fails_before_training(lora_model: torch.nn.Module,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda device_type: False)
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    with pytest.raises(TrialFailed, match="unsupported precision: bf16 autocast is not available on cpu"):
        fit(lora_model, variable_length_split(), TrainSettings(learning_rate=1e-3, precision="bf16"), pad_id=0)
    assert all(torch.equal(p, before[n]) for n, p in lora_model.named_parameters())


def test_an_update_that_overflows_the_weights_fails_the_trial_before_anything_evaluates_it(
        lora_model: torch.nn.Module) -> None:
    """A finite loss whose last step sends the weights to inf: the trial fails with its reason. Before, the NaN
    weights went on to the probes, and the trial failed with scikit-learn's "Input contains NaN"."""
    def huge_gradient(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        loss, n = classification_loss(model, batch)
        return loss * 1e30, n  # finite in fp32; times the learning rate below, not

    settings = TrainSettings(learning_rate=1e10, optimizer="sgd", max_grad_norm=0.0, micro_batch_size=8, max_steps=1)
    with pytest.raises(TrialFailed, match="non-finite weights after optimizer step 1"):
        fit(lora_model, variable_length_split(32), settings, pad_id=0, loss_fn=huge_gradient)


@pytest.mark.parametrize("method, scales", [("ia3", "ia3_l"), ("dora", "lora_magnitude_vector")])
def test_weight_decay_spares_scales_that_start_at_one_biases_and_norms(tiny_bert: Path, method: str,
                                                                       scales: str) -> None:
    """Decoupled decay pulls a parameter towards 0: for (IA)^3's vectors and DoRA's magnitudes, which scale a layer
    and start at 1, that is towards switching the layer off, not towards the base model. The matrices decay."""
    model, _ = load_classifier(str(tiny_bert), 2, seed=0)
    model = methods.get(method).apply(model, methods.get(method).resolve({}), MethodContext())
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    settings = TrainSettings(learning_rate=1e-3, weight_decay=100.0, micro_batch_size=8, max_steps=5,
                             scheduler="constant", warmup_ratio=0.0)
    fit(model, variable_length_split(32), settings, pad_id=0)
    after = dict(model.named_parameters())
    spared = [n for n in start if scales in n or n.endswith("bias")]
    assert spared and all((after[n] - start[n]).abs().max() < 0.01 for n in spared)  # Adam moves it 1e-3 a step
    decayed = [n for n in start if "classifier" in n and n.endswith("weight")]  # 10% a step on top of Adam
    assert decayed and all(after[n].norm() < 0.8 * start[n].norm() for n in decayed)


def test_the_prefix_encoders_biases_are_spared_weight_decay_too(tiny_bert: Path) -> None:
    """Its MLP names them hidden_bias and out_bias: only a parameter named 'bias' was spared."""
    from autopeft.train import decay_groups

    model, _ = load_classifier(str(tiny_bert), 2, seed=0)
    model = methods.get("prefix").apply(model, methods.get("prefix").resolve({"reparameterize": True}), MethodContext())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, spared = ([names[id(p)] for p in group["params"]] for group in decay_groups(model))
    assert {n.rpartition(".")[2] for n in spared} >= {"hidden_bias", "out_bias", "bias"}
    assert not any(n.endswith("bias") for n in decayed) and decayed
