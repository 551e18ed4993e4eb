"""`autopeft train`: one exported configuration trained again (same seeds), logged to MLflow, saved."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autopeft import adapter_io, methods
from autopeft.config import tracking_store_problem
from autopeft.errors import ConfigError
from autopeft.export import check_out, out_removed_if_unfinished
from autopeft.recipe import in_recipe_terms, read_recipe, split_changes, worded_by
from autopeft.search import Runtime, TrialOutcome, failure, positions_problem, prepare_runtime, run_trial
from autopeft.space import TrialParams
from autopeft.tracking import Tracker
from autopeft.train import optimizer_problem, precision_problem


@dataclass(frozen=True)
class TrainingRun:
    method: str
    accuracy: float
    forgetting: float
    steps: int
    seconds: float
    run_id: str
    warning: str | None = None  # the data is not what the recipe's trial was trained and scored on


def train_from_recipe(recipe: Path, out: Path, *, max_steps: int | None = None,
                      tracking_uri: str = "sqlite:///mlflow.db", force: bool = False,
                      seed: int | None = None, trust_remote_code: bool = False) -> TrainingRun:
    # A recipe never turns remote code on (it may come from someone else): the person running it does.
    config, params, trial_seed = read_recipe(recipe, max_steps=max_steps, tracking_uri=tracking_uri,
                                             trust_remote_code=trust_remote_code)
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError([f"--seed: {seed} must be between 0 and 2**32 - 1"])
    seed = trial_seed if seed is None else seed  # another training seed; the split and head stay the study's
    check_out(out, force)
    problem = tracking_store_problem(tracking_uri)
    if problem:
        raise ConfigError([problem])
    with worded_by(recipe):  # the recipe's values, named by its keys
        runtime = prepare_runtime(config)
    problem = _unrunnable_here(runtime, params)  # known before training: bad input, not a failed run
    if problem:
        raise ConfigError([in_recipe_terms(recipe, problem)])
    changed = split_changes(recipe, runtime.split_fingerprints)
    warning = (f"the {', '.join(changed)} rows differ from those {recipe}'s trial was trained and scored on (the "
               "data changed): this run's scores are not comparable with the trial's") if changed else None
    tracker = Tracker(tracking_uri)
    run_id = None
    try:  # the run is not left RUNNING, whether training, saving or logging stops it; the CLI says why in one line
        with out_removed_if_unfinished(out):  # a run that fails before its adapter is saved leaves no folder of its making
            run_id = tracker.start_run(f"train-{params.method}", {**params.flat(), "seed": seed, "model": config.model,
                                                                  "task": config.task, "max_steps": config.max_steps})
            outcome = run_trial(runtime, params, seed=seed)
            adapter_io.save(outcome.model, out)
        _log_outcome(tracker, run_id, outcome, out)
    except BaseException as exc:
        if run_id is not None:
            tracker.end_trial_run(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAIL", failure(exc))
        raise
    tracker.end_trial_run(run_id, "COMPLETE")
    return TrainingRun(params.method, outcome.accuracy, outcome.forgetting, len(outcome.train.losses),
                       outcome.train.seconds, run_id, warning)


def _unrunnable_here(runtime: Runtime, params: TrialParams) -> str | None:
    """Why this recipe cannot train with this model on this machine (a method the architecture or the installed
    packages lack, an optimizer or precision they lack, virtual tokens past the position table), by the key.
    A search records such a trial as skipped or failed and goes on; here it would be a failed MLflow run."""
    checks = (("method", lambda: methods.get(params.method).problem(runtime.base_model)),
              ("optimizer", lambda: optimizer_problem(params.training["optimizer"])),
              ("precision", lambda: precision_problem(params.training["precision"], runtime.device)),
              ("method_params", lambda: positions_problem(runtime, params)))
    return next((f"{key}: {problem}" for key, check in checks if (problem := check())), None)


def _log_outcome(tracker: Tracker, run_id: str, outcome: TrialOutcome, out: Path) -> None:
    tracker.log_curve(run_id, "train_loss", outcome.train.losses)
    tracker.log_metrics(run_id, {"val_accuracy": outcome.accuracy, "forgetting": outcome.forgetting,
                                 "trainable_params": outcome.trainable, "train_seconds": outcome.train.seconds,
                                 **{f"probe.{k}": v for k, v in outcome.probe_scores.items() if k != "forgetting"}})
    tracker.log_file(run_id, adapter_io.config_file(out))
