from pathlib import Path

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
