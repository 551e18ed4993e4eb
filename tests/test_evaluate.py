"""The mid-training score pruners compare (Evaluator.progress): how well a head separates the classes,
which moves before its accuracy does."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from autopeft.data import TextSplit, TokenizedSplit, tokenize
from autopeft.evaluate import Evaluator, class_probabilities, class_separation

# Four rows, three of class 0 (the majority) and one of class 1; each row's first token says which it is.
SPLIT = TokenizedSplit(input_ids=[[1, 5], [2, 5], [3, 5], [4, 5]], labels=torch.tensor([0, 0, 0, 1]))


class FixedHead(nn.Module):
    """A classifier whose logits per row are given (looked up by the row's first token)."""

    def __init__(self, logits_by_row: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.tensor([[0.0, 0.0], *logits_by_row])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_separation_ranks_a_head_that_still_predicts_the_majority_class() -> None:
    evaluate = Evaluator(pad_id=0)
    stuck = FixedHead([[2.0, 0.0]] * 4)  # majority class everywhere, the same for every row
    moving = FixedHead([[2.0, 0.0]] * 3 + [[0.5, 0.0]])  # same predictions, least sure of class 0 on the class-1 row
    (stuck_accuracy, stuck_score), (moving_accuracy, moving_score) = (evaluate.progress(m, SPLIT)
                                                                      for m in (stuck, moving))
    assert stuck_accuracy == moving_accuracy == 0.75 == evaluate(stuck, SPLIT)
    assert (stuck_score, moving_score) == (0.5, 1.0)  # chance; the class-1 row ranked above all class-0 rows


def test_separation_ignores_where_the_threshold_sits() -> None:
    evaluate = Evaluator(pad_id=0)
    ranked_right_but_biased = FixedHead([[9.0, 0.0], [8.0, 0.0], [7.0, 0.0], [6.0, 0.0]])  # 3 of 4 right
    all_right_but_one_ranked_wrong = FixedHead([[0.0, -1.0], [0.0, -3.0], [0.0, 0.5], [0.0, 0.2]])
    biased_accuracy, biased_score = evaluate.progress(ranked_right_but_biased, SPLIT)
    wrong_accuracy, wrong_score = evaluate.progress(all_right_but_one_ranked_wrong, SPLIT)
    assert (biased_accuracy, biased_score) == (0.75, 1.0)
    assert wrong_accuracy == 0.75 and wrong_score < 1.0


def test_separation_averages_the_classes_present_and_needs_two() -> None:
    probabilities = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    assert class_separation(probabilities, torch.tensor([0, 1, 2, 0])) == 1.0
    assert class_separation(probabilities, torch.tensor([0, 1, 2, 2])) < 1.0  # row 4: class 2 given least
    assert class_separation(probabilities, torch.tensor([0, 0, 0, 0])) is None
    one_class = TokenizedSplit(input_ids=[[1, 5], [2, 5]], labels=torch.tensor([0, 0]))
    accuracy, score = Evaluator(pad_id=0).progress(FixedHead([[2.0, 0.0]] * 2), one_class)
    assert accuracy == score == 1.0  # no separation to measure: accuracy


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_a_decoders_score_of_a_row_does_not_depend_on_the_rows_batched_with_it(family_name: str,
                                                                             tiny_models: dict[str, Path]) -> None:
    """Decoders are padded on the left. Without position ids counted from each row's first token, GPT-2's
    absolute positions shifted a row by its batch's padding: an export scored 0.58 as reported in one batch of
    100, 0.53 in batches of 16 and 0.56 row by row."""
    from autopeft.models import load_classifier

    model, tokenizer = load_classifier(str(tiny_models[family_name]), 2, seed=0)
    texts = ["a short one", "a much longer review that goes on and on about the plot and the actors for a while"]
    split = tokenize(TextSplit(texts, [0, 1]), tokenizer, max_length=64)
    together = class_probabilities(model, split, pad_id=tokenizer.pad_token_id, batch_size=2)
    alone = class_probabilities(model, split, pad_id=tokenizer.pad_token_id, batch_size=1)
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_prompt_tuning_on_a_decoder_scores_a_row_the_same_whatever_its_padding(
        family_name: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """peft's prompt tuning drops the position ids it is given, so the virtual tokens sat as far from a row as
    its batch's padding put them: tiny Llama's validation accuracy was 0.5333 in batches, 0.5167 row by row.
    The same holds for the adapter reloaded from disk (the export's test score)."""
    from autopeft import adapter_io
    from autopeft.methods import MethodContext
    from autopeft.models import load_classifier

    def scores(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        return (class_probabilities(model, split, pad_id=tokenizer.pad_token_id, batch_size=2),
                class_probabilities(model, split, pad_id=tokenizer.pad_token_id, batch_size=1))

    base, tokenizer = load_classifier(str(tiny_models[family_name]), 2, seed=0)
    texts = ["a short one", "a much longer review that goes on and on about the plot and the actors for a while"]
    split = tokenize(TextSplit(texts, [0, 1]), tokenizer, max_length=64)
    adapted = adapter_io.attach(base, "prompt", {"num_virtual_tokens": 5, "init": "random"}, MethodContext())
    together, alone = scores(adapted)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    adapter_io.save(adapted, tmp_path / "adapter")
    fresh, _ = load_classifier(str(tiny_models[family_name]), 2, seed=0)
    reloaded = adapter_io.load(fresh, tmp_path / "adapter")
    together_again, alone_again = scores(reloaded)
    torch.testing.assert_close(together_again, alone_again, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone_again, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family_name", ["gpt2", "llama"])
def test_a_prompt_tuned_causal_lm_ranks_answers_the_same_whatever_the_padding(
        family_name: str, tiny_causal_models: dict[str, Path]) -> None:
    """The causal-LM path (answer ranking and generation go through lm_logits) of the test above."""
    from autopeft import adapter_io
    from autopeft.evaluate import choice_log_likelihoods
    from autopeft.export import _load_note
    from autopeft.methods import MethodContext
    from autopeft.models import load_causal_lm

    base, tokenizer = load_causal_lm(str(tiny_causal_models[family_name]), seed=0)
    adapted = adapter_io.attach(base, "prompt", {"num_virtual_tokens": 5, "init": "random"},
                                MethodContext("CAUSAL_LM"))
    prompts = [tokenizer(t)["input_ids"] for t in ("a short one", "a much longer review of the plot and the actors")]
    choices = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" good", " bad")]
    together = choice_log_likelihoods(adapted, prompts, choices, pad_id=tokenizer.pad_token_id, batch_size=2)
    alone = choice_log_likelihoods(adapted, prompts, choices, pad_id=tokenizer.pad_token_id, batch_size=1)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    assert "count_positions_from_row_starts" in _load_note("prompt", base)  # the card tells plain-peft users
    assert _load_note("lora", base) == ""
