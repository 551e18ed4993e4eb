"""When a search stops before its trials are done, and the one line that says why.

Optuna stops a study silently (a timeout, a grid walked to its end, `study.stop()` from a callback); the user
is owed the reason. `SearchStops` holds the conditions checked after every trial and records the first that
fired: the target number of completed trials, consecutive failures, the training-step budget, and caps on
attempts, so that a space where everything fails or is rejected cannot loop for ever.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

import optuna

from autopeft import study as studies
from autopeft.config import SearchConfig

# Rejections by the memory budget cost no training (under a second each) and teach the sampler where the
# budget lies: a search may go through many of them per trial it trains.
REJECTIONS_PER_TRIAL = 20
# Trials stopped early by the pruner are what a pruned search is for (hyperband stops most of them), and
# each costs a fraction of a trial: counted against the failures' cap they ended healthy searches short.
PRUNED_PER_TRIAL = 10

Callback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]


class SearchStops:
    """The stop conditions of one run of a search (a resumed study counts only what is left to do).

    Attempts are capped at `2 * remaining + max_consecutive_failures` trials that trained or failed, at
    `PRUNED_PER_TRIAL * remaining` stopped early by the pruner (or skipped as a repeat), and at
    `REJECTIONS_PER_TRIAL * remaining` rejected by the memory budget."""

    def __init__(self, config: SearchConfig, study: optuna.Study, since: datetime.datetime | None = None) -> None:
        """`since`: when this run of the search began (`search --workers N` passes its own start to its workers,
        so a worker that starts late still counts the failures before it); default now."""
        self.config = config
        self.since = since or datetime.datetime.now()  # Optuna's trial times are naive local times too
        self.remaining = config.trials - studies.completed(study)
        self.counts = {"trained": 0, "pruned": 0, "rejected": 0}
        self.caps = {"trained": 2 * self.remaining + config.max_consecutive_failures,
                     "pruned": PRUNED_PER_TRIAL * self.remaining, "rejected": REJECTIONS_PER_TRIAL * self.remaining}
        self.reasons: list[str] = []
        self.began = time.monotonic()

    def callbacks(self) -> list[Callback]:
        # Failed, pruned or rejected trials are replaced by new samples until `trials` have completed.
        target = optuna.study.MaxTrialsCallback(self.config.trials, states=(studies.COMPLETE,))
        return [target, self._after_failures, self._at_step_budget, self._at_attempt_caps]

    def step_budget_spent(self, study: optuna.Study) -> bool:
        """Whether what is left of --max-total-steps is too little for another trial of --max-steps: a trial
        starts only if it fits, so the budget is never overspent."""
        if studies.trial_fits_budget(study, self.config):
            return False
        budget = self.config.max_total_steps
        spent = studies.steps_spent(study)
        left = f" (too few left for another {self.config.max_steps}-step trial)" if spent < budget else ""
        self.reasons.append(f"stopped at the training-step budget: {spent} of {budget} steps spent{left}")
        return True

    def reason(self, study: optuna.Study) -> str | None:
        """The first condition that stopped the search, else a timeout or an exhausted grid, else None."""
        done, trials = studies.completed(study), self.config.trials
        if self.remaining <= 0 < trials:  # a resume that asked for no more than the study holds
            return (f"nothing to run: the study already holds {done} completed trial{'s' * (done != 1)} and --trials is "
                    f"{trials}; pass a larger --trials to run more")
        if done >= trials:  # the target was met, whatever else (a step budget spent by the last trial) fired too
            return None
        if self.reasons:
            return self.reasons[0]
        # Conditions another process (a worker) may have stopped at: read from the study.
        if self.step_budget_spent(study) or self._failures_stopped(study):
            return self.reasons[0]
        held = f"{done} of {trials} trials completed"
        if self.config.timeout is not None and time.monotonic() - self.began >= self.config.timeout:
            return f"stopped at --timeout {self.config.timeout:g} s with {held}"
        if self.config.sampler == "grid":
            return f"stopped with {held}: every configuration of the grid has been tried{_rejected_points(study)}"
        return None

    def _failures_stopped(self, study: optuna.Study) -> bool:
        """Counted across the study's workers, since this run began (a resumed study's earlier failures are
        not held against it)."""
        failures = studies.failures_in_a_row(study, self.since)
        if len(failures) < self.config.max_consecutive_failures:
            return False
        self.reasons.append(f"stopped after {len(failures)} consecutive failed trial{'s' * (len(failures) > 1)}; "
                            f"last reason: {failures[-1].user_attrs.get('fail_reason', 'unknown')}")
        return True

    def _after_failures(self, study: optuna.Study, _trial: Any) -> None:
        if self._failures_stopped(study):
            study.stop()

    def _at_step_budget(self, study: optuna.Study, _trial: Any) -> None:
        if self.step_budget_spent(study):
            study.stop()

    def _at_attempt_caps(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        kind = ("rejected" if studies.rejected_by_budget(trial) else
                "pruned" if trial.state == optuna.trial.TrialState.PRUNED else "trained")
        self.counts[kind] += 1
        done = studies.completed(study)
        if self.counts[kind] >= self.caps[kind] and done < self.config.trials:
            what = {"rejected": "were rejected by the memory budget", "pruned": "were pruned early",
                    "trained": "trained or failed"}[kind]
            self.reasons.append(f"stopped with {done} of {self.config.trials} trials completed: "
                                f"{self.counts[kind]} trials {what}, the cap for {self.remaining} "
                                f"trial{'s' * (self.remaining > 1)}")
            study.stop()


def _rejected_points(study: optuna.Study) -> str:
    """The grid points the memory budget rejected: Optuna's grid counts them as tried, so a resume under a looser
    budget never trains them (said, where the message claimed every point had been tried)."""
    rejected = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False) if studies.rejected_by_budget(t)}
    if not rejected:
        return ""
    return (f" ({len(rejected)} of them rejected by the memory budget, which Optuna's grid does not draw again; a new "
            "study (--force-new) tries them under this budget)")
