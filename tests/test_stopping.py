"""A search stops short of its trials only for a stated reason: each cap on attempts, in an Optuna study whose
trials train, fail or are rejected by the memory budget (no model: the objective says what happened)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from autopeft.config import SearchConfig
from autopeft.errors import TrialFailed
from autopeft.stopping import PRUNED_PER_TRIAL, REJECTIONS_PER_TRIAL, SearchStops


def _run(outcome: Callable[[optuna.Trial], float], tmp_path: Path, *, trials: int, **options: object
         ) -> tuple[optuna.Study, SearchStops]:
    config = SearchConfig(trials=trials, objective_mode="scalar", storage=f"sqlite:///{tmp_path / 'a.db'}",
                          **options)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        try:
            return outcome(trial)
        except TrialFailed as exc:  # as the search's objective records a failure
            trial.set_user_attr("fail_reason", exc.reason)
            raise

    stops = SearchStops(config, study)
    study.optimize(objective, n_trials=10_000, catch=(TrialFailed,), callbacks=stops.callbacks())
    return study, stops


def _reject(trial: optuna.Trial) -> float:
    trial.set_constraint("memory", 1.0)
    raise optuna.TrialPruned("over the memory budget")


def test_a_search_stops_at_its_target_of_completed_trials_with_no_reason(tmp_path: Path) -> None:
    study, stops = _run(lambda trial: trial.suggest_float("x", 0, 1), tmp_path, trials=3)
    assert len(study.trials) == 3 and stops.reason(study) is None


def test_rejections_by_the_budget_are_capped_per_remaining_trial(tmp_path: Path) -> None:
    study, stops = _run(_reject, tmp_path, trials=2)
    assert len(study.trials) == REJECTIONS_PER_TRIAL * 2
    assert stops.reason(study) == (f"stopped with 0 of 2 trials completed: {REJECTIONS_PER_TRIAL * 2} trials were "
                                   "rejected by the memory budget, the cap for 2 trials")


def test_trials_the_pruner_stops_have_their_own_larger_cap(tmp_path: Path) -> None:
    """A pruned search stops most trials early by design; they once counted against the failures' cap
    (2 x trials + failures allowed) and `--trials 3 --pruner hyperband` ended at 2 of 3."""
    def pruned(trial: optuna.Trial) -> float:
        raise optuna.TrialPruned("below the rung")

    study, stops = _run(pruned, tmp_path, trials=3, max_consecutive_failures=4)
    assert len(study.trials) == PRUNED_PER_TRIAL * 3
    assert stops.reason(study) == (f"stopped with 0 of 3 trials completed: {PRUNED_PER_TRIAL * 3} trials were pruned "
                                   "early, the cap for 3 trials")


def test_trials_that_fail_between_completions_are_capped_at_twice_the_trials_plus_the_failures_allowed(
        tmp_path: Path) -> None:
    def mostly_fails(trial: optuna.Trial) -> float:
        if trial.number % 5 != 4:  # four failures in a row (one short of the stop), then a completion
            raise TrialFailed("out of memory")
        return 1.0

    study, stops = _run(mostly_fails, tmp_path, trials=3, max_consecutive_failures=5)
    assert len(study.trials) == 2 * 3 + 5
    assert stops.reason(study) == "stopped with 2 of 3 trials completed: 11 trials trained or failed, the cap for 3 trials"


@pytest.mark.parametrize(("allowed", "said"), [(1, "1 consecutive failed trial;"), (3, "3 consecutive failed trials;")])
def test_consecutive_failures_stop_the_search_and_name_the_last_reason(tmp_path: Path, allowed: int, said: str) -> None:
    def fails(trial: optuna.Trial) -> float:
        raise TrialFailed("non-finite loss")

    study, stops = _run(fails, tmp_path, trials=5, max_consecutive_failures=allowed)
    assert len(study.trials) == allowed
    assert stops.reason(study) == f"stopped after {said} last reason: non-finite loss"


def test_a_completed_trial_resets_the_failure_count(tmp_path: Path) -> None:
    def every_other(trial: optuna.Trial) -> float:
        if trial.number % 2 == 0:
            raise TrialFailed("out of memory")
        return 1.0

    study, stops = _run(every_other, tmp_path, trials=3, max_consecutive_failures=2)
    assert len(study.trials) == 6 and stops.reason(study) is None


def test_the_step_budget_starts_only_trials_that_fit_in_what_is_left(tmp_path: Path) -> None:
    def trains(trial: optuna.Trial) -> float:
        trial.set_user_attr("steps_trained", 4)
        return 1.0

    study, stops = _run(trains, tmp_path, trials=10, max_steps=4, max_total_steps=10)
    assert len(study.trials) == 2  # 8 spent: a third would end at 12, over the budget (it once ran)
    assert stops.reason(study) == ("stopped at the training-step budget: 8 of 10 steps spent (too few left for another "
                                   "4-step trial)")


def test_a_search_that_meets_its_target_as_the_step_budget_runs_out_gives_no_reason(tmp_path: Path) -> None:
    """The step budget's callback fires after the last trial too; it once named the budget as the stop."""
    def trains(trial: optuna.Trial) -> float:
        trial.set_user_attr("steps_trained", 4)
        return 1.0

    study, stops = _run(trains, tmp_path, trials=2, max_steps=4, max_total_steps=8)
    assert len(study.trials) == 2 and stops.reason(study) is None


def _finish(study: optuna.Study, state: optuna.trial.TrialState, reason: str | None = None) -> None:
    """A trial another worker ran and recorded (asked and told here, as that worker's objective would)."""
    trial = study.ask()
    if reason:
        trial.set_user_attr("fail_reason", reason)
    study.tell(trial, 1.0 if state == optuna.trial.TrialState.COMPLETE else None, state=state)


def test_failures_in_a_row_are_counted_across_workers_and_only_since_this_run_began(tmp_path: Path) -> None:
    """Each worker counted only its own failures: two workers allowed 2 in a row ran 4."""
    config = SearchConfig(trials=3, objective_mode="scalar", max_consecutive_failures=2,
                          storage=f"sqlite:///{tmp_path / 'a.db'}")
    study = optuna.create_study()
    _finish(study, optuna.trial.TrialState.FAIL, "out of memory")  # an earlier run's: a resume starts afresh
    stops = SearchStops(config, study)
    _finish(study, optuna.trial.TrialState.FAIL, "non-finite loss")
    _finish(study, optuna.trial.TrialState.FAIL, "interrupted")  # Ctrl-C: not the configuration's failure
    _finish(study, optuna.trial.TrialState.FAIL)  # a dead worker's trial, failed as stale: no reason
    assert stops.reason(study) is None
    _finish(study, optuna.trial.TrialState.FAIL, "out of memory: CUDA")
    assert stops.reason(study) == "stopped after 2 consecutive failed trials; last reason: out of memory: CUDA"


def test_a_completed_trial_between_failures_of_two_workers_resets_the_count(tmp_path: Path) -> None:
    config = SearchConfig(trials=3, objective_mode="scalar", max_consecutive_failures=2,
                          storage=f"sqlite:///{tmp_path / 'a.db'}")
    study = optuna.create_study()
    stops = SearchStops(config, study)
    for state in ("FAIL", "COMPLETE", "FAIL"):
        _finish(study, optuna.trial.TrialState[state], "nan" if state == "FAIL" else None)
    assert stops.reason(study) is None


def test_running_trials_take_their_steps_from_the_budget_before_they_finish() -> None:
    """Three workers starting at once under --max-total-steps 60 at 30 steps a trial trained 90."""
    from autopeft.study import steps_committed

    study = optuna.create_study()
    done = study.ask()
    done.set_user_attr("steps_trained", 12)  # pruned early: what it trained
    study.tell(done, 1.0)
    running = [study.ask() for _ in range(2)]
    assert steps_committed(study, running[0].number, 30) == 12  # the first running trial starts
    assert steps_committed(study, running[1].number, 30) == 12 + 30
    assert steps_committed(study, running[1].number + 1, 30) == 12 + 60


def test_a_resume_that_asks_for_no_more_trials_than_the_study_holds_says_so(tmp_path: Path) -> None:
    study, _ = _run(lambda trial: trial.suggest_float("x", 0, 1), tmp_path, trials=3)
    config = SearchConfig(trials=2, objective_mode="scalar", storage=f"sqlite:///{tmp_path / 'a.db'}")
    assert SearchStops(config, study).reason(study) == ("nothing to run: the study already holds 3 completed trials "
                                                        "and --trials is 2; pass a larger --trials to run more")
