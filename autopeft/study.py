"""The Optuna study: storage (with heartbeats, so a dead worker's trial is failed and retried), creation or
resumption with a compatibility check, per-worker sampler seeds, and the rule that decides whether a trial
may still start when several workers share one study."""

from __future__ import annotations

import os
from typing import Any

import optuna
import yaml

from autopeft.config import SearchConfig, redact_url
from autopeft.data import TaskData
from autopeft.errors import StudyError
from autopeft.space import SearchSpace, parse_space

DIRECTIONS = ("maximize", "minimize")  # validation accuracy, forgetting
COMPLETE = optuna.trial.TrialState.COMPLETE
RUNNING = optuna.trial.TrialState.RUNNING


class StaleTrialRetry:
    """Called by Optuna for a trial whose worker stopped sending heartbeats (killed, machine lost):
    close its MLflow run as KILLED and enqueue the same configuration again. (Optuna's own
    RetryFailedTrialCallback is deprecated.)"""

    def __init__(self) -> None:
        self.tracker: Any = None  # set once the tracker exists; stale trials are only found during optimize

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if self.tracker is not None and run_id:
            self.tracker.end_trial_run(run_id, "KILLED", "worker stopped (no heartbeat)")
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def connect(config: SearchConfig, on_stale: StaleTrialRetry | None = None) -> optuna.storages.BaseStorage:
    try:
        if config.storage.startswith(("sqlite:", "postgresql", "mysql")):
            return optuna.storages.RDBStorage(config.storage, heartbeat_interval=config.heartbeat_seconds,
                                              grace_period=3 * config.heartbeat_seconds,
                                              heartbeat_stale_trial_callback=on_stale)
        return optuna.storages.get_storage(config.storage)
    except Exception as exc:  # a bad URL, a missing driver or an unreachable server
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StudyError(f"--storage: cannot open {redact_url(config.storage)}: {message}") from exc


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def open_study(config: SearchConfig, space: SearchSpace, task: TaskData,
               on_stale: StaleTrialRetry | None = None) -> optuna.Study:
    """Create the study (recording config, space and split), or resume it when they match."""
    storage = connect(config, on_stale)
    if study_exists(storage, config.study):
        if config.force_new:
            optuna.delete_study(study_name=config.study, storage=storage)
        else:
            study = optuna.load_study(study_name=config.study, storage=storage)
            check_compatible(study, config, space, task)
            return study
    study = optuna.create_study(study_name=config.study, storage=storage, directions=list(DIRECTIONS))
    study.set_user_attr("config", config.public_dict())
    study.set_user_attr("space_fingerprint", space.fingerprint)
    study.set_user_attr("space_yaml", open(config.space).read())  # workers elsewhere need no copy of the file
    study.set_user_attr("split", task.describe())
    return study


def load_for_worker(config: SearchConfig, on_stale: StaleTrialRetry | None = None) -> tuple[optuna.Study, SearchConfig, SearchSpace]:
    """Join an existing study: its recorded config and space, with this worker's storage and tracking."""
    storage = connect(config, on_stale)
    if not study_exists(storage, config.study):
        raise StudyError(f"--study: no study named {config.study!r} in {redact_url(config.storage)}; create it "
                         "with `autopeft search --trials 0 ...` (or `--workers N`) first")
    study = optuna.load_study(study_name=config.study, storage=storage)
    recorded = dict(study.user_attrs["config"])
    space = parse_space(yaml.safe_load(study.user_attrs["space_yaml"]), f"{config.study}:space")
    local = {k: getattr(config, k) for k in ("storage", "tracking_uri", "artifacts_dir", "worker_id", "timeout")}
    joined = SearchConfig.from_dict({**recorded, **local, "space": config.space,
                                     "trials": config.trials or recorded["trials"]})
    return study, joined, space


def check_compatible(study: optuna.Study, config: SearchConfig, space: SearchSpace, task: TaskData) -> None:
    recorded = study.user_attrs.get("config", {})
    problems = []
    if study.user_attrs.get("space_fingerprint") != space.fingerprint:
        problems.append("a different search space")
    for key in ("model", "task", "max_steps", "train_size", "val_size", "test_size", "max_length", "seed"):
        if key in recorded and recorded[key] != getattr(config, key):
            problems.append(f"{key}={recorded[key]!r} (now {getattr(config, key)!r})")
    if study.user_attrs.get("split", task.describe()) != task.describe():
        problems.append("a different data split")
    if problems:
        raise StudyError(f"--study: {config.study!r} already exists with {', '.join(problems)}; resume it with the "
                         "same settings, choose another --study name, or pass --force-new to replace it")


def seeded_sampler(config: SearchConfig, study: optuna.Study) -> optuna.samplers.BaseSampler:
    """TPE seeded by the trial count (a resumed study does not replay its first samples) and by the worker
    (workers starting together do not all sample the same first configuration)."""
    worker = config.worker_id if config.worker_id is not None else 0
    return optuna.samplers.TPESampler(seed=config.seed + len(study.trials) + 7919 * worker,
                                      multivariate=True, group=True)


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(COMPLETE,)))


def may_start(study: optuna.Study, number: int, target: int) -> bool:
    """Whether trial `number` is still needed: completed trials plus running trials that started before it
    must be fewer than the target. Counting only earlier trials breaks ties between workers that ask at
    the same moment, so the study ends with exactly `target` completed trials."""
    trials = study.get_trials(deepcopy=False, states=(COMPLETE, RUNNING))
    ahead = sum(1 for t in trials if t.state == COMPLETE or t.number < number)
    return ahead < target


def worker_id_default() -> int:
    return os.getpid()
