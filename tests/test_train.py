"""The training loop: exact gradient accumulation, optimizers that learn, non-finite losses that fail."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from autopeft import methods
from autopeft.data import TokenizedSplit, collate
from autopeft.errors import TrialFailed
from autopeft.models import load_classifier
from autopeft.train import TrainSettings, classification_loss, fit


@pytest.fixture()
def lora_model(tiny_bert: Path) -> torch.nn.Module:
    model, _ = load_classifier(str(tiny_bert), 2, seed=0)
    params = methods.get("lora").resolve({"r": 4, "target_modules": "all_linear"})
    return methods.get("lora").apply(model, params, "SEQ_CLS")


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


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_each_optimizer_lowers_the_loss(lora_model: torch.nn.Module, optimizer: str) -> None:
    split = variable_length_split(64, seed=1)
    settings = TrainSettings(learning_rate=1e-2, optimizer=optimizer, micro_batch_size=16, max_steps=40,
                             warmup_ratio=0.0, scheduler="constant")
    result = fit(lora_model, split, settings, pad_id=0)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first
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
        model = methods.get("lora").apply(model, methods.get("lora").resolve({}), "SEQ_CLS")
        torch.manual_seed(3)
        losses.append(fit(model, variable_length_split(32), TrainSettings(learning_rate=1e-3, max_steps=5, seed=3),
                          pad_id=0).losses)
    assert losses[0] == losses[1]
