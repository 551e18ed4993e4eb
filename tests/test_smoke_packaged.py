"""Smoke tests on the real packaged MiniLM and the real Rotten Tomatoes data (slow: tens of seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopeft.config import SearchConfig
from autopeft.search import prepare_runtime, run_trial
from autopeft.space import TrialParams


@pytest.mark.slow
def test_a_lora_trial_learns_the_real_task(tmp_path: Path) -> None:
    runtime = prepare_runtime(SearchConfig(train_size=800, val_size=300, test_size=100))
    params = TrialParams("lora", {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "attention",
                                  "use_rslora": False},
                         {"learning_rate": 3e-3, "optimizer": "adamw", "precision": "fp32", "grad_accum_steps": 1,
                          "micro_batch_size": 16, "weight_decay": 0.0, "warmup_ratio": 0.06, "scheduler": "linear"})
    outcome = run_trial(runtime, params, seed=0)
    assert outcome.accuracy > 0.65  # well above the 57.8% majority class after 150 steps
    assert 0.0 < outcome.forgetting < 1.0
    assert outcome.trainable / outcome.total < 0.01
