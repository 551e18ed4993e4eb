"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

from autopeft.config import SearchConfig

SPACE = """\
method: [lora, ia3]
training:
  learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
  optimizer: [adamw, adafactor]
  grad_accum_steps: [1, 2]
  micro_batch_size: [4, 8]
methods:
  lora:
    r: [2, 4, 8]
    alpha: {low: 2, high: 16}
    target_modules: [qv, all_linear]
"""


def tiny_config(tmp_path: Path, tiny_bert: Path, **overrides: object) -> SearchConfig:
    """A search on the tiny BERT and a small real split, with every store inside tmp_path."""
    space = tmp_path / "space.yaml"
    if not space.exists():
        space.write_text(SPACE)
    values = dict(model=str(tiny_bert), space=str(space), study="t", storage=f"sqlite:///{tmp_path}/o.db",
                  tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifacts_dir=str(tmp_path / "a"), trials=3,
                  max_steps=3, train_size=64, val_size=32, test_size=32, seed=0)
    return SearchConfig(**{**values, **overrides})  # type: ignore[arg-type]
