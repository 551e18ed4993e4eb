"""Retrain an export's leading candidates with more training seeds, so the choice among them rests on means.

A search keeps its best run, and the best of many noisy runs is, on average, luckier than its configuration:
on MiniLM at 60 steps, random search's pick averaged up to 0.11 below its recorded validation accuracy when
retrained with new seeds (experiments/search/seed_spread.md). A few more runs of the top few candidates cost a
few trials' training and give an export whose accuracy holds up when the user trains it again.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna
import torch

from autopeft.errors import TrialFailed, first_line
from autopeft.space import TrialParams
from autopeft.study import scores

if TYPE_CHECKING:
    from autopeft.search import Runtime
    from autopeft.tracking import Tracker

SEED_STRIDE = 1_000_003  # extra seeds lie far from any trial's own (the study's seed + the trial number)
KEY_PREFIX = "confirmation.trial-"  # study attribute holding a trial's runs: seed -> [accuracy, forgetting] or [reason]


@dataclass(frozen=True)
class Confirmation:
    """A trial's own run and its extra runs: (seed, validation accuracy, forgetting), or a failure reason."""

    trial_number: int
    runs: tuple[tuple[int, float, float], ...]  # the search's own run first
    failures: tuple[str, ...] = ()

    @property
    def accuracy(self) -> float:
        return statistics.fmean(run[1] for run in self.runs)

    @property
    def accuracy_sd(self) -> float:
        return statistics.stdev(run[1] for run in self.runs) if len(self.runs) > 1 else 0.0

    @property
    def forgetting(self) -> float:
        return statistics.fmean(run[2] for run in self.runs)

    def as_dict(self) -> dict:
        return {"trial": self.trial_number, "val_accuracy_mean": self.accuracy, "val_accuracy_sd": self.accuracy_sd,
                "forgetting_mean": self.forgetting, "runs": [list(run) for run in self.runs],
                "failures": list(self.failures)}


def extra_seeds(trial_seed: int, count: int) -> tuple[int, ...]:
    return tuple(trial_seed + SEED_STRIDE * k for k in range(1, count + 1))


def confirm(study: optuna.Study, trial: optuna.trial.FrozenTrial, runtime: Runtime, count: int,
            tracker: Tracker | None = None) -> Confirmation:
    """The trial's run and `count` more of its configuration with new seeds. Runs are kept in the study as each
    ends, so a repeated or interrupted export trains only what is missing."""
    from autopeft.search import run_trial

    key = f"{KEY_PREFIX}{trial.number}"
    kept: dict[str, list] = dict(study.user_attrs.get(key, {}))
    params = TrialParams.from_flat(trial.user_attrs["params"])
    seeds = extra_seeds(trial.user_attrs["seed"], count)
    for seed in seeds:
        if str(seed) in kept:
            continue
        try:
            outcome = run_trial(runtime, params, seed=seed)
            kept[str(seed)] = [outcome.accuracy, outcome.forgetting]
        except (TrialFailed, torch.OutOfMemoryError) as exc:  # e.g. a NaN loss on this seed: the config is fragile
            kept[str(seed)] = [getattr(exc, "reason", None) or first_line(exc)]
        study.set_user_attr(key, kept)
    confirmation = _from_kept(trial, kept, seeds)
    run_id = trial.user_attrs.get("mlflow_run_id")
    run_id = tracker.resolve(run_id) if tracker is not None and run_id else None  # None: a fallback store's, unsynced
    if tracker is not None and run_id is not None:
        tracker.log_metrics(run_id, {
            "confirmed_val_accuracy_mean": confirmation.accuracy, "confirmed_val_accuracy_sd": confirmation.accuracy_sd,
            "confirmed_forgetting_mean": confirmation.forgetting, "confirmed_runs": len(confirmation.runs)})
    return confirmation


def _from_kept(trial: optuna.trial.FrozenTrial, kept: dict[str, list], seeds: Sequence[int]) -> Confirmation:
    runs = [(trial.user_attrs.get("seed", -1), *scores(trial))]
    runs += [(seed, *kept[str(seed)]) for seed in seeds if len(kept[str(seed)]) == 2]
    failures = tuple(f"seed {seed}: {kept[str(seed)][0]}" for seed in seeds if len(kept[str(seed)]) == 1)
    return Confirmation(trial.number, tuple((int(s), float(a), float(f)) for s, a, f in runs), failures)


def kept_confirmations(study: optuna.Study) -> list[Confirmation]:
    """The confirmation runs earlier exports kept in the study (none trained here), best mean first."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    found = [_from_kept(trials[int(key[len(KEY_PREFIX):])], kept, [int(seed) for seed in kept])
             for key, kept in study.user_attrs.items()
             if key.startswith(KEY_PREFIX) and int(key[len(KEY_PREFIX):]) in trials]
    return sorted(found, key=lambda c: -c.accuracy)
