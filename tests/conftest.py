"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder (real tokenizer, so
real texts tokenize as they would with the packaged MiniLM), and small task files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `make test` runs the suite in two xdist workers on a 2-core machine. Each worker (and each CLI subprocess it
# starts) then gets one torch thread: two workers of two threads each would fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from autopeft.models import save_tiny_bert, save_tiny_model  # imports torch: after the thread count

pytest_plugins = ["tests.servers"]  # real PostgreSQL and MLflow servers, started by the tests themselves

# No test reads the hub (this machine cannot reach it): a name that is not a local folder fails at once instead of
# after seconds of retries. Subprocesses inherit it. A test of the hub path sets its own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests (packaged models, real servers, a browser) go first: started last, one of them would keep
    one worker busy for a minute or two while the other has nothing left to take."""
    def long(item: pytest.Item) -> bool:
        return any(next(item.iter_markers(name), None) for name in ("slow", "servers"))

    items.sort(key=lambda item: not long(item))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Classification models of each block layout: BERT, Llama (grouped-query attention), GPT-2 (Conv1D),
    with weights wide enough that texts get distinct representations (so every method can learn)."""
    return {f: save_tiny_model(tmp_path_factory.mktemp(f"tiny-{f}"), f, init_scale=0.2) for f in ("bert", "llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_causal_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {f: save_tiny_model(tmp_path_factory.mktemp(f"tiny-{f}-lm"), f, causal_lm=True, init_scale=0.5)
            for f in ("llama", "gpt2")}


@pytest.fixture(scope="session")
def tiny_search_args(tiny_bert: Path) -> list[str]:
    """CLI options for a search that finishes in seconds on the tiny model and a small real split."""
    return ["--model", str(tiny_bert), "--train-size", "120", "--val-size", "60", "--test-size", "60",
            "--max-steps", "3"]
