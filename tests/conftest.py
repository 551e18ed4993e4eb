"""Shared fixtures: a tiny randomly initialised BERT saved as a local model folder (real tokenizer, so
real texts tokenize as they would with the packaged MiniLM), and small task files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from autopeft.models import resolve_model_path

pytest_plugins = ["tests.servers"]  # real PostgreSQL and MLflow servers, started by the tests themselves


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    packaged = Path(resolve_model_path("packaged:all-MiniLM-L6-v2"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (packaged / name).exists():
            shutil.copy(packaged / name, folder / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_search_args(tiny_bert: Path) -> list[str]:
    """CLI options for a search that finishes in seconds on the tiny model and a small real split."""
    return ["--model", str(tiny_bert), "--train-size", "120", "--val-size", "60", "--test-size", "60",
            "--max-steps", "3"]
