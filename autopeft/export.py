"""Pick a trial by a stated rule and write it as files the ecosystem reads.

Default rule ("balanced"): among the Pareto-optimal trials that learned the task (validation accuracy above
the majority-class rate), the one with the highest validation accuracy whose forgetting is at most
`tolerance` above the least-forgetting of them. Accuracy alone would pick whatever overwrote the most
general ability; forgetting alone would pick an adapter that never moved (it forgets nothing and learns
nothing, which is why trials at the majority-class rate are not candidates unless no trial learned).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml

from autopeft import methods
from autopeft.config import SearchConfig
from autopeft.errors import StudyError
from autopeft.evaluate import accuracy
from autopeft.space import TrialParams

Rule = Literal["balanced", "best-accuracy", "least-forgetting"]
RULES: tuple[str, ...] = ("balanced", "best-accuracy", "least-forgetting")
DEFAULT_TOLERANCE = 0.05  # absolute, on the forgetting (1 - CKA) scale


def load_existing_study(name: str, storage: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"--study: no study named {name!r} in {storage}") from None
    except Exception as exc:
        raise StudyError(f"--storage: cannot open {storage!r}: {str(exc).splitlines()[0]}") from exc


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def select_trial(study: optuna.Study, rule: Rule = "balanced",
                 tolerance: float = DEFAULT_TOLERANCE) -> optuna.trial.FrozenTrial:
    if not completed_trials(study):
        raise StudyError(f"--study: {study.study_name!r} has no completed trial to export")
    pareto = study.best_trials
    if rule == "best-accuracy":
        return max(pareto, key=lambda t: (t.values[0], -t.values[1]))
    majority = study.user_attrs.get("split", {}).get("validation_majority", 0.0)
    learned = [t for t in pareto if t.values[0] > majority + 1e-9] or pareto
    least = min(learned, key=lambda t: (t.values[1], -t.values[0]))
    if rule == "least-forgetting":
        return least
    within = [t for t in learned if t.values[1] <= least.values[1] + tolerance]
    return max(within, key=lambda t: (t.values[0], -t.values[1]))


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    for trial in completed_trials(study):
        if trial.number == number:
            return trial
    raise StudyError(f"--trial: {number} is not a completed trial of {study.study_name!r}; "
                     f"completed: {', '.join(str(t.number) for t in completed_trials(study)) or 'none'}")


def training_yaml(config: SearchConfig, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The configuration `autopeft train` (and a person) needs to reproduce this trial."""
    params = TrialParams.from_flat(trial.user_attrs["params"])
    return {
        "model": config.model, "task": config.task, "method": params.method,
        "method_params": params.method_params, **params.training,
        "max_steps": config.max_steps, "seed": trial.user_attrs["seed"], "split_seed": config.seed,
        "train_size": config.train_size, "val_size": config.val_size, "test_size": config.test_size,
        "max_length": config.max_length,
    }


@dataclass(frozen=True)
class ExportResult:
    trial: optuna.trial.FrozenTrial
    out: Path
    test_accuracy: float
    files: list[str]


def test_accuracy(study: optuna.Study, trial: optuna.trial.FrozenTrial, config: SearchConfig) -> float:
    """Held-out test accuracy of this one trial, computed once and kept in the study (never used to select)."""
    key = f"test_accuracy.trial-{trial.number}"
    if key in study.user_attrs:
        return float(study.user_attrs[key])
    from peft import PeftModel

    from autopeft.search import prepare_runtime

    runtime = prepare_runtime(config)
    model = PeftModel.from_pretrained(copy.deepcopy(runtime.base_model), trial.user_attrs["adapter_dir"])
    value = accuracy(model, runtime.test, pad_id=runtime.pad_id, batch_size=config.eval_batch_size)
    study.set_user_attr(key, value)
    return value


def export_trial(study_name: str, storage: str, out: Path, *, trial_number: int | None = None,
                 rule: Rule = "balanced", tolerance: float = DEFAULT_TOLERANCE,
                 with_weights: bool = False) -> ExportResult:
    study = load_existing_study(study_name, storage)
    trial = find_trial(study, trial_number) if trial_number is not None else select_trial(study, rule, tolerance)
    config = SearchConfig.from_dict(study.user_attrs["config"])
    adapter_dir = Path(trial.user_attrs.get("adapter_dir", ""))
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StudyError(f"trial {trial.number}: its adapter is not at {adapter_dir} (was the search run on "
                         "another machine?); export from where the search ran")
    score = test_accuracy(study, trial, config)
    out.mkdir(parents=True, exist_ok=True)
    files = ["adapter_config.json", "training.yaml", "metrics.json"]
    shutil.copy(adapter_dir / "adapter_config.json", out / "adapter_config.json")
    (out / "training.yaml").write_text(yaml.safe_dump(training_yaml(config, trial), sort_keys=False))
    metrics = {"study": study_name, "trial": trial.number,
               "rule": "--trial" if trial_number is not None else rule, "tolerance": tolerance,
               "val_accuracy": trial.values[0], "forgetting": trial.values[1], "test_accuracy": score,
               "trainable_params": trial.user_attrs.get("trainable_params"),
               "peft_backed": methods.get(trial.user_attrs["params"]["method"]).peft_backed}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if with_weights:
        for weights in adapter_dir.glob("adapter_model.*"):
            shutil.copy(weights, out / weights.name)
            files.append(weights.name)
    return ExportResult(trial, out, score, files)
