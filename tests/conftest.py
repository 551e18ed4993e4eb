"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder (real tokenizer, so
real texts tokenize as they would with the packaged MiniLM), and small task files."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopeft.models import save_tiny_bert

pytest_plugins = ["tests.servers"]  # real PostgreSQL and MLflow servers, started by the tests themselves


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture()
def tiny_search_args(tiny_bert: Path) -> list[str]:
    """CLI options for a search that finishes in seconds on the tiny model and a small real split."""
    return ["--model", str(tiny_bert), "--train-size", "120", "--val-size", "60", "--test-size", "60",
            "--max-steps", "3"]
