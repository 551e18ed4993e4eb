"""How far a pick's validation accuracy leads the other candidates, against the validation set's sampling error.

A validation accuracy measured on n rows has a standard error of sqrt(p (1 - p) / n): about 0.018 at 0.79 on
500 rows, nine rows' worth. On MiniLM at 60 steps the leading trials of a search routinely sit that close
(experiments/search/discussion.md), and retraining a configuration with another seed moves its accuracy by as
much again (seed_spread.md). So when the rule's runner-up is within two standard errors of its pick, the pick's
lead may be luck, and the user is told so, with the command that checks it (export --confirm-seeds: it catches a
lucky run; it cannot rank candidates whose means differ by less than the seed-to-seed spread).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from autopeft.study import scores

CLOSE = 2.0  # standard errors: within this of the pick, a candidate's lower accuracy may be chance


def standard_error(accuracy: float, rows: int) -> float:
    """The binomial standard error of an accuracy measured on `rows` examples (sampling error only)."""
    return math.sqrt(accuracy * (1.0 - accuracy) / rows)


def close_margin(accuracy: float, rows: int) -> float:
    """How far below the pick a candidate may lie and still count as close: CLOSE standard errors, and at least
    CLOSE rows' worth, so a pick at 0 or 1 (standard error 0) still counts an exact tie as close."""
    return CLOSE * max(standard_error(accuracy, rows), 1.0 / rows)


def validation_rows(study: optuna.Study) -> int | None:
    """Rows of the study's validation split, as recorded with the split; None for a study without it."""
    rows = study.user_attrs.get("split", {}).get("validation_size")
    return int(rows) if rows else None


@dataclass(frozen=True)
class Lead:
    """The pick, its accuracy's standard error, and the rule's other candidates within CLOSE of it."""

    pick: optuna.trial.FrozenTrial
    rows: int
    standard_error: float
    close: tuple[optuna.trial.FrozenTrial, ...]  # in the rule's order
    others: int  # the rule's other candidates, close or not
    ranked_on: str = "val accuracy"  # what the rule ranks by, and so what "within" compares

    def describe(self) -> str:
        measured = f"val accuracy {scores(self.pick)[0]:.4f} on {self.rows} rows, standard error {self.standard_error:.4f}"
        if not self.others:
            return (f"{measured}; it is the rule's only candidate, and one training run, which a new seed can move "
                    "further: export --confirm-seeds 2 retrains it to measure its mean")
        if self.close:
            numbers = ", ".join(str(t.number) for t in self.close)
            on = "" if self.ranked_on == "val accuracy" else f" on the {self.ranked_on} (the accuracy's standard errors)"
            where = (f"trial{'s' if len(self.close) > 1 else ''} {numbers} within {CLOSE:g} standard errors of it{on}, "
                     "a lead these rows cannot establish")
        else:
            where = f"it leads the rule's other candidates on the {self.ranked_on} by more than {CLOSE:g} standard errors"
        top = f" --confirm-top {len(self.close) + 1}" if self.close else ""
        # Sampling is only part of it: a configuration's runs also spread with the training seed, and a lead
        # beyond two standard errors was still luck for random search's picks (experiments/search/lead_check.md).
        return (f"{measured}; {where}. Each is one training run, which a new seed can move further: "
                f"export --confirm-seeds 2{top} retrains the leaders and picks on the means")


def lead(study: optuna.Study, ranked: list[optuna.trial.FrozenTrial],
         score: Callable[[optuna.trial.FrozenTrial], float] | None = None,
         score_name: str = "val accuracy") -> Lead | None:
    """How `ranked[0]` (a rule's pick) leads the rest of `ranked` on `score` (validation accuracy unless
    given, named `score_name`), against the sampling error of the pick's validation accuracy."""
    rows = validation_rows(study)
    if rows is None or not ranked:
        return None
    score = score or (lambda t: scores(t)[0])
    pick, accuracy = ranked[0], scores(ranked[0])[0]
    margin = close_margin(accuracy, rows)
    close = tuple(t for t in ranked[1:] if score(pick) - score(t) <= margin)
    return Lead(pick, rows, standard_error(accuracy, rows), close, len(ranked) - 1, score_name)
