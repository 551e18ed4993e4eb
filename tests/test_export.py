from __future__ import annotations

import optuna
import pytest

from autopeft.errors import StudyError
from autopeft.export import candidates, lead_of, majority_warning, select_trial


def study_with(values: list[tuple[float, float]], majority: float = 0.578) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("split", {"validation_majority": majority})
    for accuracy, forgetting in values:
        trial = study.ask()
        study.tell(trial, (accuracy, forgetting))
    return study


# (accuracy, forgetting): 0 never learned; 1-4 are the Pareto front of learners; 5 is dominated.
TRIALS = [(0.578, 0.001), (0.745, 0.051), (0.767, 0.096), (0.781, 0.139), (0.796, 0.251), (0.70, 0.30)]


@pytest.mark.parametrize(("rule", "tolerance", "expected"), [
    ("balanced", 0.05, 2),  # most accurate within 0.05 of 0.051 (trial 0 did not learn: not a candidate)
    ("balanced", 0.1, 3),
    ("balanced", 0.0, 1),
    ("best-accuracy", 0.05, 4),
    ("least-forgetting", 0.05, 1),
])
def test_selection_rules(rule: str, tolerance: float, expected: int) -> None:
    assert select_trial(study_with(TRIALS), rule, tolerance).number == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["balanced", "best-accuracy", "least-forgetting"])
def test_a_third_objective_breaks_the_rules_ties(rule: str) -> None:
    """Two trials equal on accuracy and forgetting: the one with fewer trainable parameters (the study's third
    objective, minimised) is the pick, not the earlier one."""
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("split", {"validation_majority": 0.578})
    for values in [(0.70, 0.0, 2147), (0.70, 0.0, 355), (0.60, 0.0, 100)]:
        study.tell(study.ask(), values)
    assert select_trial(study, rule, 0.05).number == 1


def scalar_study_with(values: list[tuple[float, float]], weight: float) -> optuna.Study:
    """A `--objective-mode scalar` study as search.py records it: one value, the two scores as attributes."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("config", {"objective_mode": "scalar", "forgetting_weight": weight})
    study.set_user_attr("split", {"validation_majority": 0.578, "validation_size": 500})
    for accuracy, forgetting in values:
        trial = study.ask()
        trial.set_user_attr("val_accuracy", accuracy)
        trial.set_user_attr("forgetting", forgetting)
        study.tell(trial, accuracy - weight * forgetting)
    return study


@pytest.mark.parametrize(("weight", "expected"), [(1.0, 1), (0.2, 3), (0.0, 4)])
def test_a_scalar_study_picks_by_its_own_objective_by_default(weight: float, expected: int) -> None:
    """The trade-off the user stated with --forgetting-weight, not the balanced rule's (which picks 2)."""
    assert select_trial(scalar_study_with(TRIALS, weight)).number == expected
    assert select_trial(scalar_study_with(TRIALS, weight), "balanced").number == 2


def test_the_scalar_rule_on_a_pareto_study_weighs_forgetting_by_one() -> None:
    assert select_trial(study_with(TRIALS), "best-scalar").number == 1


def test_the_scalar_picks_lead_is_measured_on_the_scalar_objective() -> None:
    """Trials 2-4 are more accurate than the pick but behind it on the objective: only trial 2 (0.023 behind,
    against a margin of two standard errors, 0.039 at 500 rows) is within reach of it."""
    study = scalar_study_with(TRIALS, 1.0)
    lead = lead_of(study, candidates(study))
    assert lead is not None and lead.pick.number == 1
    assert [t.number for t in lead.close] == [2]


def test_when_nothing_learned_the_least_forgetting_trial_is_still_chosen() -> None:
    assert select_trial(study_with([(0.578, 0.01), (0.578, 0.002)])).number == 1


def test_a_study_without_completed_trials_cannot_be_exported() -> None:
    with pytest.raises(StudyError, match="no completed trial"):
        select_trial(study_with([]))


def test_a_pick_no_better_than_the_majority_class_is_flagged_whatever_chose_it() -> None:
    nothing = study_with([(0.578, 0.01), (0.578, 0.002)])
    warning = majority_warning(nothing, select_trial(nothing))
    assert warning == ("trial 1 is no better than the majority class (val accuracy 0.5780; always answering the most "
                       "common label scores 0.5780): it has learned nothing usable")
    learned = study_with(TRIALS)
    assert majority_warning(learned, select_trial(learned)) is None
    assert majority_warning(learned, learned.trials[0]) is not None  # e.g. picked by --trial 0


def test_asking_for_a_trial_that_did_not_complete_says_how_it_ended_and_why() -> None:
    from autopeft.export import find_trial

    study = study_with([(0.7, 0.01)])
    failed = study.ask()
    failed.set_user_attr("fail_reason", "non-finite loss")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    with pytest.raises(StudyError, match=r"--trial: 1 is not a completed trial of '.*' \(fail: non-finite loss\); "
                                         r"completed: 0$"):
        find_trial(study, 1)
    with pytest.raises(StudyError, match=r"--trial: 7 is not a completed trial of '[^(]*'; completed: 0$"):
        find_trial(study, 7)


def test_an_accuracy_equal_to_a_majority_rate_float32_cannot_hold_exactly_has_not_beaten_it() -> None:
    """1/3 as a float32 accuracy reads 0.33333334 > 0.333...: it was taken for a trial that learned something."""
    import numpy as np

    study = study_with([(float(np.float32(1 / 3)), 0.0), (float(np.float32(2 / 3)), 0.1)], majority=1 / 3)
    study.set_user_attr("split", {"validation_majority": 1 / 3, "validation_size": 30})
    assert majority_warning(study, study.trials[0]) is not None
    assert majority_warning(study, study.trials[1]) is None
    assert select_trial(study, "least-forgetting").number == 1  # the one that learned
