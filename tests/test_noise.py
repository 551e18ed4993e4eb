"""How far a pick leads: the validation set's sampling error, and which of the rule's candidates sit within it."""

from __future__ import annotations

import math

import optuna
import pytest

from autopeft.export import candidates, lead_of
from autopeft.noise import lead, standard_error


def study_with(accuracies: list[float], rows: int | None, forgetting: float = 0.01) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("split", {"validation_majority": 0.5, **({"validation_size": rows} if rows else {})})
    for accuracy in accuracies:
        study.tell(study.ask(), (accuracy, forgetting))
    return study


def test_standard_error_is_the_binomial_one_and_halves_with_four_times_the_rows() -> None:
    assert standard_error(0.79, 500) == pytest.approx(math.sqrt(0.79 * 0.21 / 500))
    assert standard_error(0.79, 500) == pytest.approx(0.0182, abs=1e-4)
    assert standard_error(0.79, 2000) == pytest.approx(standard_error(0.79, 500) / 2)


def test_candidates_within_two_standard_errors_of_the_pick_are_named() -> None:
    # 500 rows at 0.79: standard error 0.0182, so within 0.0364 is close; 0.75 (0.04 below) is not.
    study = study_with([0.75, 0.79, 0.77, 0.76], rows=500)
    found = lead(study, candidates(study, "max-accuracy-under-forgetting=1").trials)
    assert found is not None
    assert found.pick.number == 1 and [t.number for t in found.close] == [2, 3]
    assert "trials 2, 3 within 2 standard errors" in found.describe() and "--confirm-top 3" in found.describe()


def test_with_ten_times_the_rows_the_same_lead_is_clear() -> None:
    study = study_with([0.75, 0.79, 0.77, 0.76], rows=5000)
    found = lead(study, candidates(study, "max-accuracy-under-forgetting=1").trials)
    assert found is not None and found.close == ()
    assert "leads the rule's other candidates on the val accuracy by more than 2" in found.describe()


def test_a_scalar_rules_closeness_is_said_to_be_on_its_objective() -> None:
    """best-scalar ranks on accuracy - weight x forgetting: a trial 0.15 below in accuracy is close on that,
    and the message once read as if it were close in accuracy."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("split", {"validation_majority": 0.5, "validation_size": 100})
    study.set_user_attr("config", {"objective_mode": "scalar", "forgetting_weight": 0.5})
    for accuracy, forgetting in ((0.58, 0.29), (0.43, 0.0)):  # objectives 0.435 and 0.43
        study.tell(study.ask(), (accuracy, forgetting))
    found = lead_of(study, candidates(study))
    assert found is not None and [t.number for t in found.close] == [1]
    assert "trial 1 within 2 standard errors of it on the objective (accuracy - 0.5 x forgetting) (the accuracy's standard errors)" in found.describe()


def test_an_exact_tie_at_perfect_accuracy_is_close_though_its_standard_error_is_zero() -> None:
    study = study_with([1.0, 1.0], rows=50)
    found = lead(study, candidates(study, "max-accuracy-under-forgetting=1").trials)
    assert found is not None and found.standard_error == 0.0 and [t.number for t in found.close] == [1]


def test_no_lead_without_the_split_size_or_for_a_rule_that_ranks_on_forgetting() -> None:
    bare = study_with([0.79, 0.78], rows=None)
    assert lead_of(bare, candidates(bare)) is None
    study = study_with([0.79, 0.78], rows=500)
    assert lead_of(study, candidates(study, "least-forgetting")) is None
    assert lead_of(study, candidates(study, "balanced")) is not None


def test_the_rules_only_candidate_is_said_to_be_one() -> None:
    study = study_with([0.79], rows=500)
    found = lead(study, candidates(study, "max-accuracy-under-forgetting=1").trials)
    assert found is not None and found.others == 0 and "only candidate" in found.describe()
