from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from autopeft.models import load_classifier
from autopeft.probes import RepresentationDrift, linear_cka, wikipedia_paragraphs


def test_linear_cka_is_one_for_rotations_and_scalings_and_low_for_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, torch.randn(64, 16, generator=gen)) < 0.5


def test_probe_texts_are_real_wikipedia_prose() -> None:
    paragraphs = wikipedia_paragraphs()
    assert len(paragraphs) > 1000
    assert paragraphs[0].startswith("Anarchism is a political philosophy")
    assert not any("[[" in p or "{{" in p for p in paragraphs[:200])


def test_drift_is_zero_for_the_base_and_grows_with_damage(tiny_bert: Path) -> None:
    model, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    probe = RepresentationDrift(tokenizer, n_texts=32, seed=0)
    probe.fit_base(model)
    assert probe.forgetting(copy.deepcopy(model)) == pytest.approx(0.0, abs=1e-9)
    small, large = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for scale, net in ((0.01, small), (1.0, large)):
            gen = torch.Generator().manual_seed(1)
            for p in net.bert.encoder.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen))
    assert 0.0 < probe.forgetting(small) < probe.forgetting(large)


def test_probe_texts_are_fixed_for_a_seed(tiny_bert: Path) -> None:
    _, tokenizer = load_classifier(str(tiny_bert), 2, seed=0)
    assert RepresentationDrift(tokenizer, n_texts=8, seed=3).texts == RepresentationDrift(tokenizer, n_texts=8, seed=3).texts
