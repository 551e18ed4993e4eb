"""The Optuna study: storage (with heartbeats, so a dead worker's trial is failed and retried), creation or
resumption with a compatibility check, per-worker sampler seeds, and the rule that decides whether a trial
may still start when several workers share one study."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import yaml

from autopeft.budget import recorded_over
from autopeft.config import (
    LOCAL_PATH_KEYS,
    OPTUNA_TABLES,
    SearchConfig,
    absolute_if_local,
    absolute_sqlite_url,
    format_bytes,
    missing_sqlite_file,
    redact_url,
    sqlite_file,
    sqlite_of_another_kind,
    tracking_store_problem,
)
from autopeft.data import TaskData
from autopeft.errors import StudyError, first_line
from autopeft.models import weights_fingerprint
from autopeft.space import SearchSpace, parse_space

DIRECTION = {"accuracy": "maximize", "forgetting": "minimize", "memory": "minimize", "trainable_params": "minimize"}
COMPLETE = optuna.trial.TrialState.COMPLETE
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL
WAITING = optuna.trial.TrialState.WAITING


class StaleTrialRetry:
    """Called by Optuna for a trial whose worker stopped sending heartbeats (killed, machine lost):
    close its MLflow run as KILLED and enqueue the same configuration again. (Optuna's own
    RetryFailedTrialCallback is deprecated.)"""

    def __init__(self) -> None:
        self.tracker: Any = None  # set once the tracker exists; stale trials are only found during optimize

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        run_id = self.tracker.resolve(run_id) if self.tracker is not None and run_id else None  # another store's?
        if self.tracker is not None and run_id:
            self.tracker.end_trial_run(run_id, "KILLED", "worker stopped (no heartbeat)")
        if trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def connect(config: SearchConfig, on_stale: StaleTrialRetry | None = None) -> optuna.storages.BaseStorage:
    require_optuna_store(config.storage)
    try:
        _make_sqlite_folder(config.storage)
        if config.storage.startswith(("sqlite:", "postgresql", "mysql")):
            return optuna.storages.RDBStorage(config.storage, heartbeat_interval=config.heartbeat_seconds,
                                              grace_period=3 * config.heartbeat_seconds,
                                              heartbeat_stale_trial_callback=on_stale)
        return optuna.storages.get_storage(config.storage)
    except Exception as exc:  # a bad URL, a missing driver or an unreachable server
        raise StudyError(f"--storage: cannot open {redact_url(config.storage)}: {first_line(exc)}") from exc


def _make_sqlite_folder(url: str) -> None:
    """A new sqlite store may go in a new folder (`--storage sqlite:///runs/a.db`), as MLflow's sqlite store
    does for `--tracking-uri`; sqlite itself only creates the file."""
    database = sqlite_file(url)
    if database:
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def require_optuna_store(url: str) -> None:
    """Optuna writes its tables into any sqlite file it opens: another program's (MLflow's own mlflow.db) is
    refused before it connects."""
    foreign = sqlite_of_another_kind(url, OPTUNA_TABLES)
    if foreign:
        raise StudyError(f"--storage: {foreign} is not an Optuna store (it holds another program's tables); name "
                         "the study's own database, e.g. sqlite:///autopeft.db")


def require_existing_store(url: str, name: str) -> None:
    """Commands that read a study (worker, export, report) leave no empty sqlite file behind on a typo."""
    missing = missing_sqlite_file(url)
    if missing:
        raise StudyError(f"--study: no study named {name!r} in {url} (the file {missing} does not exist)")


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def existing_study(config: SearchConfig) -> optuna.Study | None:
    """The study this search would resume; None when it creates its own (none of that name in the store yet,
    or --force-new), without creating a missing sqlite file by looking."""
    if config.force_new or missing_sqlite_file(config.storage):
        return None
    storage = connect(config)
    return optuna.load_study(study_name=config.study, storage=storage) if study_exists(storage, config.study) else None


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
            # The settings that may change on a resume (trials, budgets, sampler, the MLflow store: said by
            # tracking_change) are this run's now: workers joining the study read them from here.
            study.set_user_attr("config", config.public_dict())
            return study
    study = optuna.create_study(study_name=config.study, storage=storage, directions=directions(config))
    study.set_user_attr("config", config.public_dict())
    study.set_user_attr("space_fingerprint", space.fingerprint)
    study.set_user_attr("space_yaml", Path(config.space).read_text())  # workers elsewhere need no copy of the file
    study.set_user_attr("split", task.describe())
    study.set_user_attr("model_weights", weights_fingerprint(config.model))
    return study


def load_for_worker(config: SearchConfig, on_stale: StaleTrialRetry | None = None) -> tuple[optuna.Study, SearchConfig, SearchSpace]:
    """Join an existing study: its recorded config and space, with this worker's storage and tracking."""
    require_existing_store(config.storage, config.study)
    storage = connect(config, on_stale)
    if not study_exists(storage, config.study):
        raise StudyError(f"--study: no study named {config.study!r} in {redact_url(config.storage)}; create it "
                         "with `autopeft search --trials 0 ...` (or `--workers N`) first")
    study = optuna.load_study(study_name=config.study, storage=storage)
    recorded = dict(study.user_attrs["config"])
    space = recorded_space(study)
    if not (config.trials or recorded["trials"]):
        raise StudyError(f"--trials: study {config.study!r} was created with --trials 0, so it has no target; pass "
                         "--trials N, the completed trials the study should reach")
    local = {k: getattr(config, k) for k in ("storage", "tracking_uri", "artifacts_dir", "worker_id", "timeout")}
    local["tracking_uri"] = config.tracking_uri or recorded_tracking_uri(recorded)
    joined = SearchConfig.from_dict({**recorded, **local, "space": config.space,
                                     "trials": config.trials or recorded["trials"]})
    problem = tracking_store_problem(joined.tracking_uri)
    if problem:
        raise StudyError(problem)
    if _other_weights(study, joined.model):  # another machine's copy, or one saved again: its trials would not fit
        raise StudyError(f"--model: {joined.model} holds other weights on this machine than study {config.study!r} "
                         "was created with; give this worker the same model files")
    return study, joined, space


def parent_run_attr(study: optuna.Study, config: SearchConfig, holds: Callable[[str], Any]) -> str:
    """The study attribute that holds its MLflow parent run in the store this process logs to. The study's own
    store (the one it records, or any store that `holds` its parent run: the same server by another name) keeps
    `mlflow_parent_run_id`, which report and export read. A worker told another --tracking-uri keeps its own
    parent there under a key of that store: it once overwrote the study's pointer (report then looked for the
    parent in the wrong store) and made each later worker open yet another parent."""
    recorded = study.user_attrs.get("config", {}).get("tracking_uri")
    here = absolute_sqlite_url(redact_url(config.tracking_uri))
    known = study.user_attrs.get("mlflow_parent_run_id")
    if recorded in (None, here) or known is None or holds(known):
        return "mlflow_parent_run_id"
    return f"mlflow_parent_run_id@{here}"


def recorded_tracking_uri(recorded: dict[str, Any]) -> str:
    """The tracking store the study was created with, for a worker not told one: its runs then join the
    study's parent run. A URL's password is never recorded, so such a store must be given again."""
    uri = recorded["tracking_uri"]
    if ":***@" in uri:
        raise StudyError(f"--tracking-uri: the study logs to {uri}, whose password is not recorded; pass "
                         "--tracking-uri with it")
    return uri


def validation_majority(study: optuna.Study) -> float | None:
    """The validation accuracy of always answering the most common label (recorded with the split): the
    score of a trial that learned nothing."""
    return study.user_attrs.get("split", {}).get("validation_majority")


def beats_majority(study: optuna.Study, accuracy: float) -> bool:
    """Whether a validation accuracy is at least one row above always answering the most common label (True
    when the study recorded no majority rate). Half a row of slack: accuracies are float32 counts of rows, so an
    accuracy equal to a rate like 1/3 reads a hair above it."""
    majority = validation_majority(study)
    if majority is None:
        return True
    rows = study.user_attrs.get("split", {}).get("validation_size")
    return accuracy > majority + (0.5 / rows if rows else 1e-6)


def is_scalar(study: optuna.Study) -> bool:
    """Whether the study optimises one value, accuracy - forgetting_weight x forgetting (its trials' value)."""
    return study.user_attrs.get("config", {}).get("objective_mode") == "scalar"


def default_rule(study: optuna.Study) -> str:
    """The export rule a study's pick defaults to: a scalar study's own objective, else the balanced rule on
    the Pareto front (autopeft.export states both)."""
    return "best-scalar" if is_scalar(study) else "balanced"


def forgetting_weight(study: optuna.Study) -> float:
    """The weight of forgetting in the study's scalar objective (1, the default, for a Pareto study)."""
    return float(study.user_attrs.get("config", {}).get("forgetting_weight", 1.0))


def recorded_space(study: optuna.Study) -> SearchSpace:
    """The space a study was created with, as it recorded it (workers and exports elsewhere need no file)."""
    return parse_space(yaml.safe_load(study.user_attrs["space_yaml"]), f"{study.study_name}:space")


def check_settings_before_loading(config: SearchConfig, space: SearchSpace) -> None:
    """A resume with other settings or another space is refused before the model and data load (minutes on a
    real model); the split, which needs the data, is checked when the study opens."""
    study = existing_study(config)
    if study is not None:
        _refuse(config, _setting_problems(study, config, space))


STRATEGY_OPTIONS = {"sampler": "--sampler", "pruner": "--pruner", "prune_after": "--prune-after"}


def completed_before(config: SearchConfig) -> int:
    """The completed trials a resumed study already holds (0 for a new one): where its progress bar starts."""
    study = existing_study(config)
    return completed(study) if study is not None else 0


def strategy_changes(config: SearchConfig) -> list[str]:
    """How a resume changes the way trials are chosen and stopped, which it may (a study explored at random can
    go on with TPE), but which a user leaving an option at its default may not mean: a grid study resumed
    without --sampler grid goes on with TPE, which may repeat a configuration the grid ran."""
    study = existing_study(config)
    if study is None:
        return []
    recorded = study.user_attrs.get("config", {})
    changed = {key: flag for key, flag in STRATEGY_OPTIONS.items() if key in recorded and recorded[key] != getattr(config, key)}
    if config.pruner == "none":
        changed.pop("prune_after", None)  # means nothing without a pruner

    def shown(value: Any) -> str:
        return "at its default" if value is None else str(value)
    return [f"{flag} {shown(getattr(config, key))} (it ran with {flag} {shown(recorded[key])} before)"
            for key, flag in changed.items()]


def tracking_change(config: SearchConfig) -> str | None:
    """A resume that moves the study to another MLflow store: said, since the runs so far stay in the old one."""
    study = existing_study(config)
    if study is None:
        return None
    recorded = study.user_attrs.get("config", {}).get("tracking_uri")
    now = absolute_sqlite_url(redact_url(config.tracking_uri))
    if recorded is None or recorded == now:
        return None
    return (f"--tracking-uri {now}: the study logged to {recorded} until now, and its runs so far stay there; its "
            "parent run, this run's trials, report and export use the new store from here on")


def check_compatible(study: optuna.Study, config: SearchConfig, space: SearchSpace, task: TaskData) -> None:
    problems = _setting_problems(study, config, space)
    changes = _data_changes(study, task)
    if changes:
        problems.append(f"a different data split ({'; '.join(changes)})")
    if _other_weights(study, config.model):
        problems.append(f"other weights than {config.model} holds now (saved again since the search)")
    _refuse(config, problems)


def _refuse(config: SearchConfig, problems: list[str]) -> None:
    if problems:
        raise StudyError(f"--study: {config.study!r} already exists with {', '.join(problems)}; resume it with the "
                         "same settings, choose another --study name, or pass --force-new to replace it")


def _setting_problems(study: optuna.Study, config: SearchConfig, space: SearchSpace) -> list[str]:
    recorded = study.user_attrs.get("config", {})
    problems = []
    if study.user_attrs.get("space_fingerprint") != space.fingerprint:
        problems.append("a different search space")
    for key in ("model", "task", "max_steps", "train_size", "val_size", "test_size", "max_length", "seed",
                "objectives", "objective_mode", "forgetting_weight", "task_type", "text_column", "label_column",
                "text_pair_column", "label_words", "template", "causal_eval", "ood_task", "ood_text_column",
                "ood_label_column", "ood_text_pair_column", "probes"):
        now = getattr(config, key)
        now = list(now) if isinstance(now, tuple) else now  # the study's record is JSON: lists
        if key == "probes" and study.user_attrs.get("probe_names") in (recorded.get(key), now) and \
                None in (recorded.get(key), now):
            continue  # the default set, named one time and not the other: the same probes
        if key in recorded and not _same_setting(key, recorded[key], now):
            was = study.user_attrs.get("probe_names") if key == "probes" and recorded[key] is None else recorded[key]
            problems.append(f"{key}={was!r} (now {now!r})")  # the default probes by their names, not None
    return problems + _over_new_budget(study, config.memory_budget)


def _over_new_budget(study: optuna.Study, budget: int | None) -> list[str]:
    """A resume may change --memory-budget, but not below a completed trial's estimate: the sampler would take
    that trial as within the budget (its constraint was met against the old one, or there was none) and keep
    proposing its region, and the pick could be a configuration the budget rules out."""
    if budget is None:
        return []
    over = {t.number: t.user_attrs["memory_estimate"]["total"] for t in study.get_trials(deepcopy=False, states=(COMPLETE,))
            if recorded_over(t.user_attrs.get("memory_estimate", {}), budget)}
    if not over:
        return []
    trials = ", ".join(map(str, sorted(over)))
    needs = format_bytes(max(over.values()))
    said = f"completed trial{'s' * (len(over) > 1)} {trials} estimated above --memory-budget {format_bytes(budget)} "
    return [said + f"(up to {needs})"]


def check_same_data(study: optuna.Study, task: TaskData) -> None:
    """An export scores the study's own held-out rows: refused when the data changed since the search."""
    changes = _data_changes(study, task)
    if changes:
        raise StudyError(f"--study: {study.study_name!r} was searched on other data ({'; '.join(changes)}); its "
                         "test rows are gone: restore the data the search used, or search again")


def check_same_model(study: optuna.Study, model: str) -> None:
    """An export puts a trial's adapter on the model: refused when other weights were saved at its path since."""
    if _other_weights(study, model):
        raise StudyError(f"--study: {study.study_name!r} was searched on other weights than {model} holds now (saved "
                         "again since the search); restore the model the search used, or search again")


def _other_weights(study: optuna.Study, model: str) -> bool:
    """Whether the model's files differ from those the study recorded (a study recorded before this: no)."""
    recorded = study.user_attrs.get("model_weights")
    return recorded is not None and recorded != weights_fingerprint(model)


def _same_setting(key: str, recorded: Any, now: Any) -> bool:
    """Equal settings; a task given once as a relative and once as an absolute path is the same task."""
    if key in LOCAL_PATH_KEYS and isinstance(recorded, str) and isinstance(now, str):
        return absolute_if_local(recorded) == absolute_if_local(now)
    return recorded == now


def _data_changes(study: optuna.Study, task: TaskData) -> list[str]:
    """How the task's split differs from the one the study recorded (describe() hashes every row: once)."""
    now = task.describe()
    return _split_changes(study.user_attrs.get("split", now), now)


def _split_changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two recorded splits, in a user's words: which splits hold other rows (the
    data changed, or another split seed or size), and any other setting by name."""
    # The task's name is the config's to compare (a path relative to the folder the search ran in); a key the
    # record lacks was added by a later version of autopeft: nothing to compare it with.
    changed = [k for k in recorded if k != "task" and recorded.get(k) != now.get(k) and not _reworded(k, recorded, now)]
    splits = [s for s in ("train", "validation", "test", "ood") if any(k.startswith(f"{s}_") for k in changed)]
    others = [k for k in changed if not k.startswith(("train_", "validation_", "test_", "ood_"))]
    return ([f"other rows in {', '.join(splits)}"] if splits else []) + others


def _reworded(key: str, recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """A split's origin worded anew over the same rows (session 31 named a fallback sample 'random', which
    earlier versions called 'stratified'): the rows are what a study must keep."""
    split = key.removesuffix("_origin")
    fingerprint = f"{split}_fingerprint"
    return key.endswith("_origin") and fingerprint in recorded and recorded[fingerprint] == now.get(fingerprint)


def directions(config: SearchConfig) -> list[str]:
    if config.objective_mode == "scalar":
        return ["maximize"]  # accuracy - forgetting_weight * forgetting
    return [DIRECTION[name] for name in config.objectives]


def seeded_sampler(config: SearchConfig, study: optuna.Study, space: SearchSpace | None = None) -> optuna.samplers.BaseSampler:
    """The chosen sampler, seeded by the trial count (a resumed study does not replay its first samples) and
    by the worker (workers starting together do not all sample the same first configuration)."""
    worker = config.worker_id if config.worker_id is not None else 0
    # Optuna's samplers take seeds below 2**32; a process id (the default worker id) can reach 2**22
    seed = (config.seed + len(study.trials) + 7919 * worker) % 2**32
    startup = startup_trials(config.trials)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=startup)
    if config.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.sampler == "grid":
        if space is None:
            raise StudyError("--sampler grid needs the search space")
        # One seed for every process: the grid is shuffled by it, and the grid ids earlier trials and other workers
        # recorded must name the same points (a resume or a second worker skipped some and repeated others).
        return optuna.samplers.GridSampler(space.grid(), seed=config.seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup)


def startup_trials(budget: int) -> int:
    """Random trials before a model-based sampler starts modelling: a third of the budget, 2 to 10.
    Optuna's defaults (10 for TPE and GP, a first generation of 50 for NSGA-II) make any search of 10
    trials or fewer, the default 6 included, pure random search: measured in experiments/search, where
    TPE, NSGA-II and random drew identical trials at 10 trials."""
    return max(2, min(10, budget // 3))


REDUCTION_FACTOR = 3  # successive halving keeps the best third of the trials at each rung


def first_rung(config: SearchConfig) -> int:
    """Steps before a pruner may stop a trial. By default half the steps: at a quarter of a 60-step MiniLM
    trial nearly every configuration still predicts the majority class (experiments/search/discussion.md).
    Longer trials can start earlier (`--prune-after`): a pruned trial then costs less of a full one."""
    return config.prune_after or max(1, config.max_steps // 2)


def pruner_checkpoints(config: SearchConfig) -> tuple[int, ...]:
    """Steps at which intermediate accuracy is reported: where the pruner can decide, and nowhere else (each
    report costs an evaluation). Successive halving (and each hyperband bracket) decides at its rungs, the
    first rung times powers of the reduction factor; the median pruner at each quarter from the first rung."""
    first, steps = first_rung(config), config.max_steps
    if config.pruner in ("hyperband", "successive-halving"):
        rungs = [first]
        while rungs[-1] * REDUCTION_FACTOR < steps:
            rungs.append(rungs[-1] * REDUCTION_FACTOR)
        return tuple(rungs)
    if config.pruner == "median":
        quarter = max(1, steps // 4)
        return tuple(sorted({first} | {step for step in range(quarter, steps, quarter) if step > first}))
    return ()


def make_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    """Pruners compare a mid-training score on a validation slice (`Evaluator.progress`: a head's class
    separation, a causal LM's accuracy), reported at `pruner_checkpoints` (scalar mode only)."""
    first = first_rung(config)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=config.max_steps,
                                              reduction_factor=REDUCTION_FACTOR)
    if config.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=REDUCTION_FACTOR)
    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=first)
    return optuna.pruners.NopPruner()


def has_scores(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial finished with scores: a pruned one keeps only its last mid-training value."""
    return trial.state == COMPLETE and bool(trial.values)


def scores(trial: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """(validation accuracy, forgetting) of a completed trial, whatever the study's objectives."""
    attrs = trial.user_attrs
    if "val_accuracy" in attrs and "forgetting" in attrs:
        return float(attrs["val_accuracy"]), float(attrs["forgetting"])
    return float(trial.values[0]), float(trial.values[1])


def pareto_front(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials no other trial beats on both accuracy (higher) and forgetting (lower)."""
    points = [(t, *scores(t)) for t in trials]
    return [t for t, acc, fgt in points
            if not any(a >= acc and f <= fgt and (a > acc or f < fgt) for _, a, f in points)]


def rejected_by_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Pruned before training because its memory estimate exceeded --memory-budget (its constraint says by
    how much)."""
    return trial.state == optuna.trial.TrialState.PRUNED and trial.constraints.get("memory", 0) > 0


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(COMPLETE,)))


def has_heartbeats(study: optuna.Study) -> bool:
    """Whether a dead worker's trial in this study's storage turns stale (RDB storages opened by `connect`)."""
    interval = getattr(study._storage, "get_heartbeat_interval", None)  # the storage is not public in optuna 5
    return interval is not None and interval() is not None


def may_start(study: optuna.Study, number: int, target: int) -> bool:
    """Whether trial `number` is still needed: completed trials plus running trials that started before it
    must be fewer than the target. Counting only earlier trials breaks ties between workers that ask at
    the same moment, so the study ends with exactly `target` completed trials."""
    trials = study.get_trials(deepcopy=False, states=(COMPLETE, RUNNING))
    ahead = sum(1 for t in trials if t.state == COMPLETE or t.number < number)
    return ahead < target


def retry_waiting(study: optuna.Study) -> bool:
    """Whether a dead worker's configuration waits to run again (queued by `StaleTrialRetry`)."""
    return any("retry_of" in t.user_attrs for t in study.get_trials(deepcopy=False, states=(WAITING,)))


def steps_spent(study: optuna.Study) -> int:
    """Training steps every trial of the study has recorded (finished ones, and running ones so far)."""
    return sum(t.user_attrs.get("steps_trained", 0) for t in study.get_trials(deepcopy=False))


def trial_fits_budget(study: optuna.Study, config: SearchConfig) -> bool:
    """Whether another trial of --max-steps fits in what is left of --max-total-steps (always, without one)."""
    return config.max_total_steps is None or steps_spent(study) + config.max_steps <= config.max_total_steps


def steps_committed(study: optuna.Study, number: int, max_steps: int) -> int:
    """Training steps spent by finished trials, plus what running trials that started before trial `number`
    will train (a full trial each: a pruned one may give some back)."""
    trials = study.get_trials(deepcopy=False)
    spent = sum(t.user_attrs.get("steps_trained", 0) for t in trials if t.state != RUNNING)
    return spent + max_steps * sum(1 for t in trials if t.state == RUNNING and t.number < number)


def failures_in_a_row(study: optuna.Study, since: datetime.datetime) -> list[optuna.trial.FrozenTrial]:
    """The trials started at or after `since` that failed since the last one that completed, in the order they
    finished, across every worker of the study. Interrupted trials and dead workers' trials (no recorded
    reason) are not the configuration's failures and are left out; so are pruned ones."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE, FAIL))
                if t.datetime_start is not None and t.datetime_start >= since and t.datetime_complete is not None
                and (t.state == COMPLETE or t.user_attrs.get("fail_reason") not in (None, "interrupted"))]
    finished.sort(key=lambda t: t.datetime_complete)
    last_success = max((i for i, t in enumerate(finished) if t.state == COMPLETE), default=-1)
    return finished[last_success + 1:]


def worker_label(pid: int | None = None) -> str:
    """Which process runs a trial (this one, or process `pid` on this machine), recorded as its objective begins."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def fail_unstarted_trials(study: optuna.Study, grace_seconds: float) -> list[int]:
    """Fail the running trials whose worker died between creating them and starting their objective (before
    Optuna's first heartbeat, so they never turn stale): no `worker` mark after `grace_seconds`. Other workers
    waiting for the study's last places waited on such a trial for ever."""
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace_seconds)
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        if "worker" not in trial.user_attrs and trial.datetime_start is not None and trial.datetime_start < cutoff:
            try:
                study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its worker stopped before the trial began")
                study.tell(trial.number, state=FAIL)
            except (RuntimeError, ValueError):  # another worker failed it first, or it began after all
                continue
            failed.append(trial.number)
    return failed


def worker_id_default() -> int:
    return os.getpid()
