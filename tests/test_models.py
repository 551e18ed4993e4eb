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
