"""The Optuna study and the objective. The base model and tokenized data load once per process; every
trial deep-copies the pristine base, attaches its adapter, trains, evaluates, probes and logs."""

from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from autopeft import methods, memory
from autopeft.config import SearchConfig
from autopeft.data import TaskData, TokenizedSplit, load_task, tokenize
from autopeft.errors import StudyError, TrialFailed
from autopeft.evaluate import accuracy
from autopeft.models import count_parameters, load_classifier
from autopeft.probes import RepresentationDrift
from autopeft.space import SearchSpace, TrialParams, load_space
from autopeft.tracking import Tracker
from autopeft.train import TrainResult, TrainSettings, fit

DIRECTIONS = ("maximize", "minimize")  # validation accuracy, forgetting
TASK_TYPE = "SEQ_CLS"


@dataclass
class Runtime:
    """What every trial of this process shares: loaded once, never modified by a trial."""

    config: SearchConfig
    space: SearchSpace
    task: TaskData
    tokenizer: Any
    base_model: nn.Module
    train: TokenizedSplit
    validation: TokenizedSplit
    test: TokenizedSplit
    probe: RepresentationDrift
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def prepare_runtime(config: SearchConfig, space: SearchSpace | None = None) -> Runtime:
    space = space or load_space(config.space)
    task = load_task(config.task, seed=config.seed, train_size=config.train_size,
                     val_size=config.val_size, test_size=config.test_size)
    base_model, tokenizer = load_classifier(config.model, len(task.label_names), seed=config.seed)
    base_model.eval()
    for param in base_model.parameters():  # the shared copy is never trained
        param.requires_grad_(False)
    probe = RepresentationDrift(tokenizer, seed=config.seed)
    probe.fit_base(base_model)
    splits = {name: tokenize(split, tokenizer, config.max_length) for name, split in task.splits().items()}
    return Runtime(config, space, task, tokenizer, base_model, splits["train"], splits["validation"],
                   splits["test"], probe)


def build_model(runtime: Runtime, params: TrialParams) -> nn.Module:
    """A fresh copy of the pristine base with this trial's adapter attached (only the adapter trains)."""
    model = copy.deepcopy(runtime.base_model)
    for param in model.parameters():
        param.requires_grad_(True)  # peft freezes what the method does not train
    return methods.get(params.method).apply(model, params.method_params, TASK_TYPE)


def train_settings(params: TrialParams, *, max_steps: int, seed: int) -> TrainSettings:
    known = TrainSettings.__dataclass_fields__
    return TrainSettings(max_steps=max_steps, seed=seed, **{k: v for k, v in params.training.items() if k in known})


@dataclass
class TrialOutcome:
    model: nn.Module
    train: TrainResult
    accuracy: float
    forgetting: float
    trainable: int
    total: int
    estimate: memory.MemoryEstimate
    seconds: float
    eval_seconds: float  # validation accuracy and the forgetting probe


def estimate_memory(runtime: Runtime, model: nn.Module, params: TrialParams) -> memory.MemoryEstimate:
    seq_len = max(runtime.train.lengths())  # the longest batch sets the peak
    t = params.training
    return memory.estimate(model, optimizer=t["optimizer"], precision=t["precision"],
                           micro_batch_size=t["micro_batch_size"], seq_len=seq_len)


def run_trial(runtime: Runtime, params: TrialParams, *, seed: int,
              on_built: Any = None) -> TrialOutcome:
    """Build, check the budget (via `on_built`), train, evaluate and probe one configuration."""
    start = time.perf_counter()
    model = build_model(runtime, params)
    estimate = estimate_memory(runtime, model, params)
    if on_built is not None:
        on_built(model, estimate)
    trainable, _ = count_parameters(model)
    total = sum(p.numel() for p in runtime.base_model.parameters())
    result = fit(model, runtime.train, train_settings(params, max_steps=runtime.config.max_steps, seed=seed),
                 pad_id=runtime.pad_id, device=runtime.device)
    eval_start = time.perf_counter()
    val_accuracy = accuracy(model, runtime.validation, pad_id=runtime.pad_id,
                            batch_size=runtime.config.eval_batch_size, device=runtime.device)
    forgetting = runtime.probe.forgetting(model, runtime.device)
    end = time.perf_counter()
    return TrialOutcome(model, result, val_accuracy, forgetting, trainable, total, estimate,
                        end - start, end - eval_start)


# ---------------------------------------------------------------- the study

def study_attributes(config: SearchConfig, runtime_task: TaskData, space: SearchSpace) -> dict[str, Any]:
    return {"config": config.to_dict(), "space_fingerprint": space.fingerprint, "split": runtime_task.describe()}


def open_study(config: SearchConfig, space: SearchSpace) -> optuna.Study:
    """Create the study, or load it to resume when it exists with the same space, model and task."""
    try:
        storage = optuna.storages.get_storage(config.storage)
    except Exception as exc:  # a bad URL, a missing driver or an unreachable server
        raise StudyError(f"--storage: cannot open {config.storage!r}: {str(exc).splitlines()[0]}") from exc
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if config.study in names:
        study = optuna.load_study(study_name=config.study, storage=storage)
        _check_compatible(study, config, space)
        return study
    return optuna.create_study(study_name=config.study, storage=storage, directions=list(DIRECTIONS),
                               sampler=resumed_sampler(config, None))


def _check_compatible(study: optuna.Study, config: SearchConfig, space: SearchSpace) -> None:
    recorded = study.user_attrs.get("config")
    if not recorded:
        return
    problems = []
    if study.user_attrs.get("space_fingerprint") != space.fingerprint:
        problems.append("a different search space")
    for key in ("model", "task", "max_steps", "train_size", "val_size", "test_size", "max_length"):
        if recorded.get(key) != getattr(config, key):
            problems.append(f"{key}={recorded.get(key)!r} (now {getattr(config, key)!r})")
    if problems:
        raise StudyError(f"--study: {config.study!r} already exists with {', '.join(problems)}; "
                         "resume it with the same settings or choose another --study name")


def resumed_sampler(config: SearchConfig, study: optuna.Study | None) -> optuna.samplers.BaseSampler:
    """Seed the sampler with the trial count too, so a resumed study does not replay its first samples."""
    done = len(study.trials) if study is not None else 0
    return optuna.samplers.TPESampler(seed=config.seed + done, multivariate=True, group=True)


class Objective:
    """Optuna objective: one trial -> (validation accuracy, forgetting). Failures become trial states."""

    def __init__(self, runtime: Runtime, tracker: Tracker, parent_run_id: str) -> None:
        self.runtime = runtime
        self.tracker = tracker
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        config = self.runtime.config
        params = self.runtime.space.suggest(trial)
        seed = config.seed + trial.number
        trial.set_user_attr("params", params.flat())  # exactly what is built below
        trial.set_user_attr("seed", seed)
        run_id = self.tracker.start_trial_run(self.parent_run_id, config.study, trial.number,
                                              {**params.flat(), "seed": seed})
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            outcome = run_trial(self.runtime, params, seed=seed,
                                on_built=lambda model, est: self._check_budget(trial, est))
        except optuna.TrialPruned as pruned:
            self.tracker.end_trial_run(run_id, "PRUNED", str(pruned))
            raise
        except (TrialFailed, torch.OutOfMemoryError) as exc:
            self._fail(trial, run_id, getattr(exc, "reason", None) or f"out of memory: {exc}")
        except Exception as exc:  # an unexpected error in one configuration must not end the search
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            self._fail(trial, run_id, f"{type(exc).__name__}: {exc}")
        except BaseException:  # Ctrl-C: close the run so the store holds no RUNNING trial
            trial.set_user_attr("fail_reason", "interrupted")
            self.tracker.end_trial_run(run_id, "FAIL", "interrupted")
            raise
        self._record(trial, run_id, outcome, started)
        return outcome.accuracy, outcome.forgetting

    def _check_budget(self, trial: optuna.Trial, estimate: memory.MemoryEstimate) -> None:
        budget = self.runtime.config.memory_budget
        trial.set_user_attr("memory_estimate", estimate.as_dict())
        if budget is None:
            return
        trial.set_constraint("memory", estimate.total - budget)
        if estimate.total > budget:
            reason = f"estimated peak {estimate.describe()} exceeds the budget of {budget} bytes"
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)

    def _fail(self, trial: optuna.Trial, run_id: str, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        self.tracker.end_trial_run(run_id, "FAIL", reason)
        raise TrialFailed(reason)

    def _record(self, trial: optuna.Trial, run_id: str, outcome: TrialOutcome, started: float) -> None:
        folder = Path(self.runtime.config.artifacts_dir) / self.runtime.config.study / f"trial-{trial.number}"
        outcome.model.save_pretrained(folder)
        self.tracker.log_curve(run_id, "train_loss", outcome.train.losses)
        self.tracker.log_curve(run_id, "learning_rate", outcome.train.learning_rates)
        # Overhead: everything but training steps and evaluation (sampling, adapter build, saving, logging).
        total = time.perf_counter() - started
        overhead = total - outcome.train.seconds - outcome.eval_seconds
        summary = {
            "val_accuracy": outcome.accuracy, "forgetting": outcome.forgetting,
            "trainable_params": outcome.trainable, "trainable_fraction": outcome.trainable / outcome.total,
            "wall_seconds": total, "train_seconds": outcome.train.seconds, "eval_seconds": outcome.eval_seconds,
            "overhead_seconds": overhead, "overhead_fraction": overhead / total,
            "train_tokens_per_second": outcome.train.tokens_per_second,
            "padding_fraction": 1 - outcome.train.tokens / max(1, outcome.train.positions),
            "final_train_loss": outcome.train.losses[-1], "fp16_overflow_steps": outcome.train.overflow_steps,
            "memory_estimate_bytes": outcome.estimate.total,
        }
        for key, value in summary.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("adapter_dir", str(folder.resolve()))
        self.tracker.log_metrics(run_id, summary)
        self.tracker.end_trial_run(run_id, "COMPLETE")


@dataclass(frozen=True)
class SearchSummary:
    study: optuna.Study
    config: SearchConfig
    parent_run_id: str


def run_search(config: SearchConfig, *, progress: Any = None) -> SearchSummary:
    """Run (or resume) the study until `config.trials` trials have completed or the timeout passes."""
    space = load_space(config.space)  # validated before any model or data loads
    runtime = prepare_runtime(config, space)  # bad model or data fails here, before anything is written
    study = open_study(config, space)
    if "config" not in study.user_attrs:
        for key, value in study_attributes(config, runtime.task, space).items():
            study.set_user_attr(key, value)
    elif study.user_attrs.get("split") != runtime.task.describe():
        raise StudyError(f"--study: {config.study!r} was run on a different data split; use another --study name")
    study.sampler = resumed_sampler(config, study)
    tracker = Tracker(config.tracking_uri)
    parent = tracker.open_study_run(config.study, study.user_attrs.get("mlflow_parent_run_id"),
                                    {**config.to_dict(), **runtime.task.describe()}, config.space)
    study.set_user_attr("mlflow_parent_run_id", parent)
    remaining = config.trials - _completed(study)
    if remaining > 0:
        # Stop at `trials` completed trials; failed or pruned ones are replaced by new samples, up to a cap
        # so that a space where everything fails cannot loop for ever.
        stop = optuna.study.MaxTrialsCallback(config.trials, states=(optuna.trial.TrialState.COMPLETE,))
        callbacks = [stop] + ([progress] if progress else [])
        study.optimize(Objective(runtime, tracker, parent), n_trials=2 * remaining + 3, timeout=config.timeout,
                       catch=(TrialFailed,), callbacks=callbacks, gc_after_trial=True)
    tracker.close_study_run(parent, {"completed_trials": _completed(study)})
    return SearchSummary(study, config, parent)


def _completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
