from pathlib import Path

import pytest
import torch

from autopeft.models import load_classifier


def test_a_checkpoint_with_another_class_count_gets_a_head_for_this_tasks_classes(tiny_bert: Path) -> None:
    """The tiny checkpoint carries a 2-way head; a 3-class task must get a fresh 3-way one, not a crash."""
    model, tokenizer = load_classifier(str(tiny_bert), 3, seed=0)
    with torch.no_grad():
        logits = model(**tokenizer(["a short review"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)
    again, _ = load_classifier(str(tiny_bert), 3, seed=0)
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # the new head is seeded


def test_a_local_model_given_relative_is_loaded_by_its_absolute_path(tiny_bert: Path, monkeypatch) -> None:
    """The path a model is loaded from becomes the base model of every adapter config, which must load from any
    folder: a relative one made an export's adapter_config.json point nowhere (then at the hub) elsewhere."""
    from autopeft.models import resolve_model_path

    monkeypatch.chdir(tiny_bert.parent)
    assert resolve_model_path(tiny_bert.name) == str(tiny_bert.resolve())
    model, _ = load_classifier(tiny_bert.name, 2, seed=0)
    assert model.config.name_or_path == str(tiny_bert.resolve())


def test_the_position_limit_is_the_positions_a_table_gives_not_its_rows() -> None:
    """RoBERTa numbers positions after its padding row: a 34-row table takes 32 tokens. Reading its rows as
    the limit passed rows that then failed in the first forward pass."""
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    from autopeft.models import position_table_rows

    shape = {"vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    roberta = RobertaModel(RobertaConfig(**shape, max_position_embeddings=34, pad_token_id=1))
    assert position_table_rows(roberta) == 32
    roberta(torch.ones(1, 32, dtype=torch.long) * 5)  # 32 tokens run
    with pytest.raises((IndexError, RuntimeError)):  # the table, or a buffer of as many positions, runs out
        roberta(torch.ones(1, 33, dtype=torch.long) * 5)
    assert position_table_rows(BertModel(BertConfig(**shape, max_position_embeddings=34))) == 34


@pytest.mark.parametrize(("raised", "reason"), [
    (OSError("\nThe checkpoint is incomplete.\n  (details follow)"), "The checkpoint is incomplete."),
    (OSError(), "OSError"),
])
def test_a_model_that_fails_to_load_is_refused_in_one_line_whatever_its_error_says(
        tiny_bert: Path, monkeypatch, raised: OSError, reason: str) -> None:
    """A library error that opens with a blank line, or has no message at all, still gives the one-line
    refusal naming --model (a blank message once raised IndexError instead: a traceback, exit code 1)."""
    import transformers

    from autopeft.errors import ModelError

    def refuse(*args, **kwargs):
        raise raised

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(ModelError) as refused:
        load_classifier(str(tiny_bert), 2, seed=0)
    assert str(refused.value) == f"--model: cannot load {str(tiny_bert)!r}: {reason}"


def test_a_model_path_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    """A file given as the model was reported as not existing."""
    from autopeft.errors import ModelError
    from autopeft.models import resolve_model_path

    (tmp_path / "data.csv").write_text("text,label\n")
    with pytest.raises(ModelError, match=r"data.csv is a file, not a folder \(expected a model folder"):
        resolve_model_path(str(tmp_path / "data.csv"))
    with pytest.raises(ModelError, match=r"missing does not exist \(expected a model folder"):
        resolve_model_path(str(tmp_path / "missing"))
