"""The mid-training score pruners compare (Evaluator.progress): accuracy first, confidence only breaks ties."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from autopeft.data import TokenizedSplit
from autopeft.evaluate import Evaluator

# Four rows, three of class 0 (the majority) and one of class 1; each row's first token says which it is.
SPLIT = TokenizedSplit(input_ids=[[1, 5], [2, 5], [3, 5], [4, 5]], labels=torch.tensor([0, 0, 0, 1]))


class FixedHead(nn.Module):
    """A classifier whose logits per row are given (looked up by the row's first token)."""

    def __init__(self, logits_by_row: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.tensor([[0.0, 0.0], *logits_by_row])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_confidence_breaks_a_tie_between_majority_class_predictors() -> None:
    evaluate = Evaluator(pad_id=0)
    stuck = FixedHead([[2.0, 0.0]] * 4)  # majority class everywhere, equally sure for every row
    moving = FixedHead([[2.0, 0.0]] * 3 + [[0.5, 0.0]])  # same predictions, less sure where it is wrong
    (stuck_accuracy, stuck_score), (moving_accuracy, moving_score) = (evaluate.progress(m, SPLIT)
                                                                      for m in (stuck, moving))
    assert stuck_accuracy == moving_accuracy == 0.75 == evaluate(stuck, SPLIT)
    assert moving_score > stuck_score > stuck_accuracy


def test_confidence_never_outweighs_one_more_right_answer() -> None:
    evaluate = Evaluator(pad_id=0)
    sure_majority = FixedHead([[9.0, 0.0]] * 3 + [[0.01, 0.0]])  # 3 of 4 right, very confident
    barely_all = FixedHead([[0.01, 0.0]] * 3 + [[0.0, 0.01]])  # 4 of 4 right, hardly confident
    sure_accuracy, sure_score = evaluate.progress(sure_majority, SPLIT)
    all_accuracy, all_score = evaluate.progress(barely_all, SPLIT)
    assert (sure_accuracy, all_accuracy) == (0.75, 1.0)
    assert all_score > sure_score and sure_score < 0.75 + 1 / len(SPLIT)
