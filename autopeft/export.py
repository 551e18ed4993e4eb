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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from autopeft import adapter_io, methods
from autopeft.config import SearchConfig, format_bytes
from autopeft.errors import ConfigError, StudyError
from autopeft.recipe import write_recipe
from autopeft.space import TrialParams
from autopeft.study import pareto_front, scores

if TYPE_CHECKING:
    from autopeft.search import Runtime

RULES: tuple[str, ...] = ("balanced", "best-accuracy", "least-forgetting", "max-accuracy-under-forgetting=X")
DEFAULT_TOLERANCE = 0.05  # absolute, on the forgetting probe's scale (a fraction for every probe we ship)


def load_existing_study(name: str, storage: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"--study: no study named {name!r} in {storage}") from None
    except Exception as exc:
        raise StudyError(f"--storage: cannot open {storage!r}: {str(exc).splitlines()[0]}") from exc


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def describe_rule(rule: str, tolerance: float) -> str:
    if rule == "balanced":
        return (f"the most accurate Pareto trial whose forgetting is within {tolerance} of the least-forgetting "
                "Pareto trial that beat the majority class")
    if rule.startswith("max-accuracy-under-forgetting="):
        return f"the most accurate trial whose forgetting is at most {rule.split('=', 1)[1]}"
    return {"best-accuracy": "the most accurate Pareto trial", "least-forgetting":
            "the least-forgetting Pareto trial that beat the majority class"}.get(rule, rule)


def select_trial(study: optuna.Study, rule: str = "balanced",
                 tolerance: float = DEFAULT_TOLERANCE) -> optuna.trial.FrozenTrial:
    done = completed_trials(study)
    if not done:
        raise StudyError(f"--study: {study.study_name!r} has no completed trial to export")
    if rule.startswith("max-accuracy-under-forgetting="):
        limit = _threshold(rule)
        under = [t for t in done if scores(t)[1] <= limit]
        if not under:
            raise StudyError(f"--select: no completed trial has forgetting <= {limit}")
        return max(under, key=_most_accurate)
    pareto = pareto_front(done)
    if rule == "best-accuracy":
        return max(pareto, key=_most_accurate)
    majority = study.user_attrs.get("split", {}).get("validation_majority", 0.0)
    learned = [t for t in pareto if scores(t)[0] > majority + 1e-9] or pareto
    least = min(learned, key=lambda t: (scores(t)[1], -scores(t)[0]))
    if rule == "least-forgetting":
        return least
    if rule != "balanced":
        raise ConfigError([f"--select: {rule!r} is not one of {', '.join(RULES)}"])
    within = [t for t in learned if scores(t)[1] <= scores(least)[1] + tolerance]
    return max(within, key=_most_accurate)


def _most_accurate(trial: optuna.trial.FrozenTrial) -> tuple[float, float]:
    accuracy, forgetting = scores(trial)
    return accuracy, -forgetting


def _threshold(rule: str) -> float:
    try:
        return float(rule.split("=", 1)[1])
    except ValueError:
        raise ConfigError([f"--select: {rule!r}: the threshold after '=' must be a number"]) from None


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    for trial in completed_trials(study):
        if trial.number == number:
            return trial
    raise StudyError(f"--trial: {number} is not a completed trial of {study.study_name!r}; "
                     f"completed: {', '.join(str(t.number) for t in completed_trials(study)) or 'none'}")


@dataclass(frozen=True)
class ExportResult:
    trial: optuna.trial.FrozenTrial
    out: Path
    test_accuracy: float
    files: list[str]
    retrained: bool


def prepare_out(out: Path, force: bool) -> None:
    """Write only into a new or empty folder (or an existing one with --force): never over someone's files."""
    if out.exists() and not out.is_dir():
        raise ConfigError([f"--out: {out} is a file, not a folder"])
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError([f"--out: {out} is not empty; choose a new folder or pass --force to overwrite"])
    out.mkdir(parents=True, exist_ok=True)


def adapter_of(trial: optuna.trial.FrozenTrial, runtime: Runtime, scratch: Path) -> tuple[Path, bool]:
    """The trial's saved adapter folder, or (if it was not kept here) the same configuration retrained."""
    saved = Path(trial.user_attrs.get("adapter_dir", ""))
    if adapter_io.is_saved_adapter(saved):
        return saved, False
    from autopeft.search import run_trial

    params = TrialParams.from_flat(trial.user_attrs["params"])
    adapter_io.save(run_trial(runtime, params, seed=trial.user_attrs["seed"]).model, scratch)
    return scratch, True


def held_out_accuracy(study: optuna.Study, trial: optuna.trial.FrozenTrial, runtime: Runtime, adapter: Path) -> float:
    """Held-out test accuracy of this one trial, computed once and kept in the study (never used to select)."""
    key = f"test_accuracy.trial-{trial.number}"
    if key in study.user_attrs:
        return float(study.user_attrs[key])
    model = adapter_io.load(copy.deepcopy(runtime.base_model), adapter)
    value = runtime.evaluate(model, runtime.test, runtime.device)
    study.set_user_attr(key, value)
    return value


def export_trial(study_name: str, storage: str, out: Path, *, trial_number: int | None = None,
                 rule: str = "balanced", tolerance: float = DEFAULT_TOLERANCE, with_weights: bool = False,
                 force: bool = False) -> ExportResult:
    study = load_existing_study(study_name, storage)
    trial = find_trial(study, trial_number) if trial_number is not None else select_trial(study, rule, tolerance)
    prepare_out(out, force)
    config = SearchConfig.from_dict(study.user_attrs["config"], storage=storage)
    from autopeft.search import prepare_runtime

    runtime = prepare_runtime(config)  # base model and data once, for a retrain and the test score alike
    with tempfile.TemporaryDirectory() as scratch:
        adapter, retrained = adapter_of(trial, runtime, Path(scratch))
        score = held_out_accuracy(study, trial, runtime, adapter)
        config_file = adapter_io.config_file(adapter)
        files = [config_file.name, "training.yaml", "metrics.json", "README.md"]
        shutil.copy(config_file, out / config_file.name)
        if with_weights:
            for weights in adapter.glob("adapter_model.*"):
                shutil.copy(weights, out / weights.name)
                files.append(weights.name)
    params = TrialParams.from_flat(trial.user_attrs["params"])
    write_recipe(out / "training.yaml", config, params, trial.user_attrs["seed"])
    chosen_by = f"--trial {trial_number}" if trial_number is not None else describe_rule(rule, tolerance)
    metrics = {"study": study_name, "trial": trial.number, "chosen_by": chosen_by,
               "val_accuracy": scores(trial)[0], "forgetting": scores(trial)[1], "test_accuracy": score,
               "trainable_params": trial.user_attrs.get("trainable_params"),
               "memory_estimate_bytes": trial.user_attrs.get("memory_estimate_bytes"),
               "peft_backed": methods.get(params.method).peft_backed, "retrained_for_export": retrained}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "README.md").write_text(model_card(config, trial, params, metrics))
    return ExportResult(trial, out, score, files, retrained)


def model_card(config: SearchConfig, trial: optuna.trial.FrozenTrial, params: TrialParams, metrics: dict) -> str:
    memory = metrics["memory_estimate_bytes"]
    own = ", ".join(f"{k}={v}" for k, v in params.method_params.items())
    return f"""# {params.method} adapter for {config.model} on {config.task}

Found by autopeft (study `{metrics['study']}`, trial {trial.number}).

**Why this trial**: {metrics['chosen_by']}.

| | |
|---|---|
| method | {params.method} ({own}) |
| training | {params.training['optimizer']}, lr {params.training['learning_rate']:.3g}, {params.training['precision']}, micro-batch {params.training['micro_batch_size']} x {params.training['grad_accum_steps']} accumulation, {config.max_steps} steps, seed {trial.user_attrs['seed']} |
| validation accuracy | {metrics['val_accuracy']:.4f} |
| forgetting (the study's forgetting probe) | {metrics['forgetting']:.4f} |
| held-out test accuracy (computed once, at export) | {metrics['test_accuracy']:.4f} |
| trainable parameters | {metrics['trainable_params']:,} |
| estimated peak training memory | {format_bytes(memory) if memory else 'n/a'} |

Reproduce: `autopeft train --config training.yaml`

{load_line(metrics['peft_backed'], config.task_type)}
(the adapter weights are here when exported with `--with-weights`).
"""


def load_line(peft_backed: bool, task_type: str = "classification") -> str:
    base = "AutoModelForCausalLM.from_pretrained(BASE)" if task_type == "causal_lm" else \
        "AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=N)"
    if peft_backed:
        return f"Load (peft only): `PeftModel.from_pretrained({base}, THIS_FOLDER)`"
    return f"Load (autopeft's own method, not in peft): `autopeft.adapter_io.load({base}, Path(THIS_FOLDER))`"
