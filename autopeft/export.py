"""Pick a trial by a stated rule and write it as files the ecosystem reads.

Default rule ("balanced"): among the Pareto-optimal trials that learned the task (validation accuracy above
the majority-class rate), the one with the highest validation accuracy whose forgetting is at most
`tolerance` above the least-forgetting of them. Accuracy alone would pick whatever overwrote the most
general ability; forgetting alone would pick an adapter that never moved (it forgets nothing and learns
nothing, which is why trials at the majority-class rate are not candidates unless no trial learned).
A scalar study (`--objective-mode scalar`) stated its trade-off when it ran: its default rule ("best-scalar") is
that objective, the highest accuracy - forgetting_weight x forgetting.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from autopeft import adapter_io, methods, noise
from autopeft.config import (
    DEFAULT_SPACE,
    SearchConfig,
    existing_mlflow_store_problem,
    format_bytes,
    redact_url,
)
from autopeft.confirm import Confirmation, confirm
from autopeft.errors import ConfigError, DataError, ModelError, StudyError, first_line
from autopeft.models import family, resolve_model_path
from autopeft.recipe import write_recipe
from autopeft.space import TrialParams
from autopeft.study import (
    beats_majority,
    check_same_data,
    check_same_model,
    default_rule,
    forgetting_weight,
    pareto_front,
    recorded_space,
    require_existing_store,
    require_optuna_store,
    scores,
    validation_majority,
)
from autopeft.verbalizer import template_fields

if TYPE_CHECKING:
    from autopeft.search import Runtime

RULES: tuple[str, ...] = ("balanced", "best-accuracy", "least-forgetting", "best-scalar",
                          "max-accuracy-under-forgetting=X")
DEFAULT_TOLERANCE = 0.05  # absolute, on the forgetting probe's scale (a fraction for every probe we ship)


def load_existing_study(name: str, storage: str) -> optuna.Study:
    require_existing_store(storage, name)
    require_optuna_store(storage)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise StudyError(f"--study: no study named {name!r} in {redact_url(storage)}") from None
    except Exception as exc:  # a bad URL, a missing driver or an unreachable server
        raise StudyError(f"--storage: cannot open {redact_url(storage)!r}: {first_line(exc)}") from exc


def require_search_study(study: optuna.Study, *, needs_config: bool) -> None:
    """Refuse a study another program wrote in the same database: export rebuilds the search from the config
    `autopeft search` records, and the report reads accuracy and forgetting from the first two objectives of a
    study that has no record of them."""
    if "config" in study.user_attrs:
        return
    if needs_config or len(study.directions) < 2:
        raise StudyError(f"--study: {study.study_name!r} was not written by `autopeft search` (it records no search "
                         "config, nor accuracy and forgetting); give a study the search ran")


def completed_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def describe_rule(rule: str, tolerance: float, weight: float = 1.0) -> str:
    if rule == "best-scalar":
        return f"the trial with the highest val accuracy - {weight:g} x forgetting (the scalar objective)"
    if rule == "balanced":
        return (f"the most accurate Pareto trial whose forgetting is within {tolerance} of the least-forgetting "
                "Pareto trial that beat the majority class (of any, when none did)")
    if rule.startswith("max-accuracy-under-forgetting="):
        return f"the most accurate trial whose forgetting is at most {rule.split('=', 1)[1]}"
    return {"best-accuracy": "the most accurate Pareto trial", "least-forgetting":
            "the least-forgetting Pareto trial that beat the majority class (of any, when none did)"}.get(rule, rule)


@dataclass(frozen=True)
class Candidates:
    """The trials a rule admits, best first, and the order it ranks them by (higher is better) on (accuracy,
    forgetting): a trial's own run by default, or the means of its confirmation runs."""

    trials: list[optuna.trial.FrozenTrial]
    order: Callable[[float, float], tuple[float, float]]


def accuracy_first(accuracy: float, forgetting: float) -> tuple[float, float]:
    return accuracy, -forgetting


def forgetting_first(accuracy: float, forgetting: float) -> tuple[float, float]:
    return -forgetting, accuracy


def scalar_first(weight: float) -> Callable[[float, float], tuple[float, float]]:
    """The scalar objective, then accuracy among equal scores."""
    def order(accuracy: float, forgetting: float) -> tuple[float, float]:
        return accuracy - weight * forgetting, accuracy
    return order


def select_trial(study: optuna.Study, rule: str | None = None,
                 tolerance: float = DEFAULT_TOLERANCE) -> optuna.trial.FrozenTrial:
    return candidates(study, rule, tolerance).trials[0]


def candidates(study: optuna.Study, rule: str | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Candidates:
    """The trials `rule` admits, best first; no rule is the study's default (`study.default_rule`)."""
    rule = rule or default_rule(study)
    done = completed_trials(study)
    if not done:
        raise StudyError(f"--study: {study.study_name!r} has no completed trial to export")
    if rule == "best-scalar":
        return _ranked(done, scalar_first(forgetting_weight(study)))
    if rule.startswith("max-accuracy-under-forgetting="):
        limit = _threshold(rule)
        under = [t for t in done if scores(t)[1] <= limit]
        if not under:
            raise StudyError(f"--select: no completed trial has forgetting <= {limit}")
        return _ranked(under, accuracy_first)
    pareto = pareto_front(done)
    if rule == "best-accuracy":
        return _ranked(pareto, accuracy_first)
    learned = [t for t in pareto if beats_majority(study, scores(t)[0])] or pareto
    if rule == "least-forgetting":
        return _ranked(learned, forgetting_first)
    if rule != "balanced":
        raise ConfigError([f"--select: {rule!r} is not one of {', '.join(RULES)}"])
    least = _ranked(learned, forgetting_first).trials[0]
    within = [t for t in learned if scores(t)[1] <= scores(least)[1] + tolerance]
    return _ranked(within, accuracy_first)


def majority_warning(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
    """A pick that does no better than always answering the validation set's most common label learned
    nothing a user can use; every rule can end there (the balanced rule when no trial beat the majority)."""
    majority, accuracy = validation_majority(study), scores(trial)[0]
    if majority is None or beats_majority(study, accuracy):
        return None
    return (f"trial {trial.number} is no better than the majority class (val accuracy {accuracy:.4f}; always "
            f"answering the most common label scores {majority:.4f}): it has learned nothing usable")


def lead_of(study: optuna.Study, ranked: Candidates) -> noise.Lead | None:
    """How the pick leads the rule's other candidates on the score it ranks them by (accuracy, or the scalar
    objective), against the validation accuracy's sampling error; None for a rule that ranks on forgetting."""
    if ranked.order is forgetting_first:
        return None
    name = "val accuracy" if ranked.order is accuracy_first else \
        f"objective (accuracy - {forgetting_weight(study):g} x forgetting)"
    return noise.lead(study, ranked.trials, score=lambda t: ranked.order(*scores(t))[0], score_name=name)


def _ranked(trials: list[optuna.trial.FrozenTrial], order: Callable[[float, float], tuple[float, float]]) -> Candidates:
    # The rules rank on accuracy and forgetting; a third objective (memory, trainable parameters: minimised) breaks
    # their ties, and a stable sort leaves the earlier of trials equal on all of them first.
    return Candidates(sorted(trials, key=lambda t: (*order(*scores(t)), -_third_objective(t)), reverse=True), order)


def _third_objective(trial: optuna.trial.FrozenTrial) -> float:
    values = trial.values or ()
    return float(values[2]) if len(values) > 2 else 0.0


def _threshold(rule: str) -> float:
    try:
        threshold = float(rule.split("=", 1)[1])
    except ValueError:
        threshold = math.nan
    if math.isnan(threshold):
        raise ConfigError([f"--select: {rule!r}: the threshold after '=' must be a number"])
    return threshold


def find_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    for trial in completed_trials(study):
        if trial.number == number:
            return trial
    other = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    why = other.user_attrs.get("fail_reason") or other.user_attrs.get("prune_reason") if other is not None else None
    state = f" ({other.state.name.lower()}{': ' + why if why else ''})" if other is not None else ""
    raise StudyError(f"--trial: {number} is not a completed trial of {study.study_name!r}{state}; "
                     f"completed: {', '.join(str(t.number) for t in completed_trials(study)) or 'none'}")


@dataclass(frozen=True)
class ExportResult:
    trial: optuna.trial.FrozenTrial
    out: Path
    test_accuracy: float
    files: list[str]
    retrained: bool
    confirmations: list[Confirmation] = field(default_factory=list)
    lead: noise.Lead | None = None  # how the rule's pick leads its other candidates (not for --trial or confirmation)
    warning: str | None = None  # `majority_warning`: the pick learned nothing


def check_out(out: Path, force: bool) -> None:
    """Write only into a new or empty folder (or an existing one with --force): never over someone's files.
    Checked first; the folder is created only once there is something to write (`create_out`)."""
    if out.exists() and not out.is_dir():
        raise ConfigError([f"--out: {out} is a file, not a folder"])
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError([f"--out: {out} is not empty; choose a new folder or pass --force to overwrite"])


@contextlib.contextmanager
def out_removed_if_unfinished(out: Path) -> Iterator[None]:
    """Create `out` for the block; a folder created here is removed again if the block fails (a retrain that
    fails, Ctrl-C), so a failed export leaves no empty or half-written folder. One that existed is left as is."""
    created = not out.exists()
    create_out(out)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def create_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only place, a file in the path, no permission
        raise ConfigError([f"--out: cannot create {out}: {exc.strerror or exc}"]) from None


def clear_export(out: Path) -> None:
    """Remove what an earlier export wrote into this folder (with --force), so no file of another trial stays
    beside this one's: peft would load an earlier trial's weights under this trial's config with a warning only.
    Other files in the folder are left alone."""
    adapter_io.remove_saved(out)
    for name in ("training.yaml", "metrics.json", "README.md"):
        (out / name).unlink(missing_ok=True)


def adapter_of(trial: optuna.trial.FrozenTrial, runtime: Runtime, scratch: Path) -> tuple[Path, bool]:
    """The trial's saved adapter folder, or (if it was not kept here) the same configuration retrained."""
    saved = Path(trial.user_attrs.get("adapter_dir", ""))
    if adapter_io.is_saved_adapter(saved) and _trained_by(saved, trial):
        return saved, False
    from autopeft.search import run_trial

    params = TrialParams.from_flat(trial.user_attrs["params"])
    adapter_io.save(run_trial(runtime, params, seed=trial.user_attrs["seed"]).model, scratch)
    return scratch, True


def _trained_by(folder: Path, trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the adapter in `folder` is this trial's: the recipe saved beside it names the trial's configuration
    and seed. A study replaced by --force-new reuses trial numbers, and on a machine where the new trial did not
    run, the old trial's adapter still lies at the path the new one recorded."""
    import yaml

    try:
        recipe = yaml.safe_load((folder / "training.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    params = TrialParams.from_flat(trial.user_attrs["params"])
    plain = json.loads(json.dumps({"method": params.method, "method_params": params.method_params,
                                   "seed": trial.user_attrs["seed"], **params.training}))  # tuples as YAML lists
    return isinstance(recipe, dict) and all(recipe.get(key) == value for key, value in plain.items())


def held_out_accuracy(study: optuna.Study, trial: optuna.trial.FrozenTrial, runtime: Runtime, adapter: Path) -> float:
    """Held-out test accuracy of this one trial, computed once and kept in the study (never used to select)."""
    key = f"test_accuracy.trial-{trial.number}"
    if key in study.user_attrs:
        return float(study.user_attrs[key])
    from autopeft.data import eval_positions_limited
    from autopeft.search import eval_positions, load_trained

    params = TrialParams.from_flat(trial.user_attrs["params"])
    with eval_positions_limited(eval_positions(runtime, params)):  # inside a memory budget
        value = runtime.evaluate(load_trained(runtime, adapter), runtime.test, runtime.device)
    study.set_user_attr(key, value)
    return value


def export_trial(study_name: str, storage: str, out: Path, *, trial_number: int | None = None,
                 rule: str | None = None, tolerance: float | None = None, with_weights: bool = False,
                 force: bool = False, confirm_seeds: int = 0, confirm_top: int | None = None,
                 tracking_uri: str | None = None) -> ExportResult:
    """Export the trial `rule` picks (or `trial_number`). With `confirm_seeds`, the rule's `confirm_top` leading
    candidates (default 3) each train that many more times first, logged to `tracking_uri` (default: the store
    the search recorded), and the one that leads on its runs' means is exported."""
    _check_confirmation_options(confirm_seeds, confirm_top, tracking_uri, trial_number)
    study = load_existing_study(study_name, storage)
    require_search_study(study, needs_config=True)
    rule, tolerance = rule_settings(study, rule, tolerance, trial_number)
    store = confirmation_store(study, tracking_uri) if confirm_seeds else None
    ranked = Candidates([find_trial(study, trial_number)], accuracy_first) if trial_number is not None else \
        candidates(study, rule, tolerance)
    # The study carries its space; the file it was read from (perhaps relative to another folder) is not needed.
    config = SearchConfig.from_dict(study.user_attrs["config"], storage=storage, space=str(DEFAULT_SPACE))
    check_out(out, force)
    from autopeft.search import prepare_runtime

    # Base model and data once, for a retrain and the test score alike; with the study's space, which sets
    # the base model's evaluation batches under a memory budget when its probe scores are not cached here.
    try:
        runtime = prepare_runtime(config, recorded_space(study))
    except (DataError, ModelError) as exc:
        raise type(exc)(_in_study_terms(study_name, str(exc))) from None
    check_same_data(study, runtime.task)
    check_same_model(study, config.model)
    with out_removed_if_unfinished(out):
        trial, confirmations = ranked.trials[0], []
        if confirm_seeds:
            from autopeft.tracking import Tracker  # mlflow: only when there are runs to log

            tracker = Tracker(store)
            confirmations = [confirm(study, t, runtime, confirm_seeds, tracker)
                             for t in ranked.trials[:confirm_top or DEFAULT_CONFIRM_TOP]]
            trial = find_trial(study, _leader(confirmations, ranked.order).trial_number)
        pick_lead = lead_of(study, ranked) if trial_number is None and not confirmations else None
        if Path(trial.user_attrs.get("adapter_dir", "")).resolve() == out.resolve():  # --force would delete it first
            raise ConfigError([f"--out: {out} is trial {trial.number}'s own adapter folder; export to another folder"])
        with tempfile.TemporaryDirectory() as scratch:
            adapter, retrained = adapter_of(trial, runtime, Path(scratch))
            score = held_out_accuracy(study, trial, runtime, adapter)
            clear_export(out)  # only now: an export interrupted while it retrains leaves the earlier one whole
            config_file = adapter_io.config_file(adapter)
            files = [config_file.name, "training.yaml", "metrics.json", "README.md"]
            shutil.copyfile(config_file, out / config_file.name)  # content only: a temporary file's 600 mode is not kept
            if with_weights:
                for weights in adapter.glob("adapter_model.*"):
                    shutil.copyfile(weights, out / weights.name)
                    files.append(weights.name)
        params = TrialParams.from_flat(trial.user_attrs["params"])
        write_recipe(out / "training.yaml", config, params, trial.user_attrs["seed"], runtime.split_fingerprints)
        chosen_by = (f"--trial {trial_number}" if trial_number is not None
                     else describe_rule(rule, tolerance, forgetting_weight(study)))
        warning = majority_warning(study, trial)
        if len(confirmations) > 1:
            chosen_by += (f"; then, of its {len(confirmations)} leading candidates, the best on the mean of "
                          f"{confirm_seeds + 1} runs each (its own and {confirm_seeds} with new seeds)")
        metrics = {"study": study_name, "trial": trial.number, "chosen_by": chosen_by, "warning": warning,
                   "val_accuracy": scores(trial)[0], "forgetting": scores(trial)[1],
                   "forgetting_probe": runtime.probes.primary.name, "test_accuracy": score,
                   **_sampling_error(study, scores(trial)[0]),
                   "trainable_params": trial.user_attrs.get("trainable_params"),
                   **_memory_figure(trial, runtime, params),
                   "peft_backed": methods.get(params.method).peft_backed, "retrained_for_export": retrained,
                   "load_note": _load_note(params.method, runtime.base_model),
                   "label_names": runtime.task.label_names if config.task_type != "causal_lm" else None,
                   **_generation(runtime), **_prompting(runtime),
                   "confirmation": [c.as_dict() for c in confirmations]}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "README.md").write_text(model_card(config, trial, params, metrics))
        return ExportResult(trial, out, score, files, retrained, confirmations, pick_lead, warning)


def _in_study_terms(study_name: str, problem: str) -> str:
    """A problem with the model or data the study recorded, worded as such: export has no --model or --task."""
    return re.sub(r"^--(model|task|ood-task): ", lambda found: (
        f"the {found.group(1).replace('-', ' ')} study {study_name!r} recorded (export reads it from there): "), problem)


DEFAULT_CONFIRM_TOP = 3  # candidates --confirm-seeds retrains


def _check_confirmation_options(seeds: int, top: int | None, tracking_uri: str | None, trial: int | None) -> None:
    """--confirm-seeds' companions, refused where they would be ignored."""
    if seeds < 0:
        raise ConfigError([f"--confirm-seeds: {seeds} must be 0 or more (new-seed runs per candidate)"])
    if top is not None and top < 1:
        raise ConfigError([f"--confirm-top: {top} must be at least 1 (candidates to retrain)"])
    for option, given in (("--confirm-top", top), ("--tracking-uri", tracking_uri)):
        if given is not None and not seeds:
            raise ConfigError([f"{option}: applies with --confirm-seeds only (leave it out, or add --confirm-seeds N)"])
    if top is not None and trial is not None:
        raise ConfigError([(f"--confirm-top: --trial {trial} is the one candidate --confirm-seeds retrains; leave "
                           "--confirm-top out")])


def confirmation_store(study: optuna.Study, given: str | None) -> str:
    """The MLflow store --confirm-seeds logs to: --tracking-uri, else the one the search recorded. Refused before
    anything trains when it cannot be written: MLflow created a missing sqlite file (and its folder) and the
    confirmation's metrics were logged nowhere, without a word."""
    logged_to = study.user_attrs.get("config", {}).get("tracking_uri")
    if given is None and logged_to and "***@" in logged_to:
        raise ConfigError([(f"--tracking-uri: the study recorded its MLflow store without its password "
                           f"({logged_to}); give it again as --tracking-uri")])
    uri = given or logged_to or "sqlite:///mlflow.db"
    hint = "" if given else " (where the search logged; pass the store's new place as --tracking-uri)"
    problem = existing_mlflow_store_problem(uri, "--tracking-uri", hint)
    if problem:
        raise ConfigError([problem])
    return uri


def rule_settings(study: optuna.Study, rule: str | None, tolerance: float | None,
                  trial_number: int | None = None) -> tuple[str, float]:
    """The rule (the study's default unless given) and the balanced rule's tolerance, checked. A --select
    beside --trial, or a --tolerance for a rule that has none, would be ignored: refused instead."""
    if trial_number is not None and rule is not None:
        raise ConfigError([f"--trial {trial_number} and --select {rule}: choose one (--trial exports that trial)"])
    if tolerance is not None and not 0 <= tolerance < math.inf:  # nan included
        raise ConfigError([(f"--tolerance: {tolerance} must be a finite number, 0 or more (forgetting allowed "
                            "above the least)")])
    rule = rule or default_rule(study)
    if rule.startswith("max-accuracy-under-forgetting="):
        _threshold(rule)
    elif rule not in RULES:
        raise ConfigError([f"--select: {rule!r} is not one of {', '.join(RULES)}"])
    if tolerance is not None and (rule != "balanced" or trial_number is not None):
        chosen = f"--trial {trial_number}" if trial_number is not None else f"the {rule} rule"
        raise ConfigError([(f"--tolerance: applies to the balanced rule only, and this export uses {chosen} "
                            "(leave --tolerance out, or add --select balanced)")])
    return rule, DEFAULT_TOLERANCE if tolerance is None else tolerance


def _sampling_error(study: optuna.Study, accuracy: float) -> dict:
    rows = noise.validation_rows(study)
    return {"val_rows": rows, "val_accuracy_standard_error": noise.standard_error(accuracy, rows)} if rows else {}


def _leader(confirmations: list[Confirmation], order: Callable[[float, float], tuple[float, float]]) -> Confirmation:
    """The candidate that leads on its runs' means; one that failed on any seed only if all did (a
    configuration that breaks on some seeds is not one to hand over)."""
    sound = [c for c in confirmations if not c.failures] or confirmations
    return max(sound, key=lambda c: order(c.accuracy, c.forgetting))  # ties: the rule's earlier candidate


def model_card(config: SearchConfig, trial: optuna.trial.FrozenTrial, params: TrialParams, metrics: dict) -> str:
    own = ", ".join(f"{k}={v}" for k, v in params.method_params.items())
    warning = f"\n\n**Warning**: {metrics['warning']}." if metrics["warning"] else ""
    return f"""# {params.method} adapter for {config.model} on {config.task}

Found by autopeft (study `{metrics['study']}`, trial {trial.number}).

**Why this trial**: {metrics['chosen_by']}.{warning}

| | |
|---|---|
| method | {params.method} ({own}) |
| training | {params.training['optimizer']}, lr {params.training['learning_rate']:.3g}, {params.training['precision']}, micro-batch {params.training['micro_batch_size']} x {params.training['grad_accum_steps']} accumulation, {config.max_steps} steps, seed {trial.user_attrs['seed']} |
| validation accuracy | {metrics['val_accuracy']:.4f}{_error_note(metrics)} |
| forgetting (the {metrics['forgetting_probe']} probe's) | {metrics['forgetting']:.4f} |
{_confirmed_rows(trial.number, metrics['confirmation'])}| held-out test accuracy (computed once, at export) | {metrics['test_accuracy']:.4f} |
| trainable parameters | {metrics['trainable_params']:,} |
| estimated peak training memory | {_memory_cell(metrics)} |
{_labels_row(metrics['label_names'])}
Reproduce: `autopeft train --config training.yaml`

{load_line(metrics['peft_backed'], config.task_type, len(metrics['label_names'] or []))}, where BASE is
`{resolve_model_path(config.model)}` (the adapter weights are here when exported with `--with-weights`).{metrics.get("load_note", "")}
{_prompting_section(metrics)}"""


def _memory_figure(trial: optuna.trial.FrozenTrial, runtime: Runtime, params: TrialParams) -> dict[str, Any]:
    """The exported configuration's peak training memory at the longest training row, traced as `autopeft
    estimate --config` traces it. A search without a budget kept only the quick analytic estimate, some 10%
    off; the card offers the estimate command to check, which must give the same figure."""
    from autopeft.search import target_device, traced_estimate

    figure = {"memory_estimate_seq_len": runtime.longest_row, "memory_estimate_device": target_device(runtime).type}
    try:
        estimate = traced_estimate(runtime, params)
    except Exception:  # noqa: BLE001 -- a configuration the tracer cannot follow: the search's own figure, named
        return {**figure, "memory_estimate_bytes": trial.user_attrs.get("memory_estimate_bytes"),
                "memory_estimate_level": trial.user_attrs.get("memory_estimate_level", "analytic")}
    return {**figure, "memory_estimate_bytes": estimate.total, "memory_estimate_level": estimate.level}


def _memory_cell(metrics: dict[str, Any]) -> str:
    memory, seq_len = metrics["memory_estimate_bytes"], metrics["memory_estimate_seq_len"]
    if not memory:
        return "n/a"
    level, device = metrics.get("memory_estimate_level", "analytic"), metrics.get("memory_estimate_device", "cpu")
    command = (f"`autopeft estimate --config training.yaml --seq-len {seq_len}"
               f"{' --device cuda' if device == 'cuda' else ''}`")
    again = (f"{command} traces it again; without --seq-len, at max_length" if level == "traced" else
             f"the search's quick estimate, which can be tens of percent off: {command} traces it")
    return f"{format_bytes(memory)} on {device} at the longest training row, {seq_len} tokens ({level}; {again})"


def _generation(runtime: Runtime) -> dict[str, Any]:
    """How a generate-mode accuracy was measured, so a user can generate the same way."""
    evaluator = runtime.evaluate
    if evaluator.causal is None or evaluator.mode != "generate":
        return {}
    from autopeft.evaluate import generation_cap

    return {"generate_max_new_tokens": generation_cap(evaluator.causal),
            "generate_stops_at_eos": evaluator.causal.eos_id is not None}


def _prompting(runtime: Runtime) -> dict[str, Any]:
    """A causal-LM task's prompt and answers: without them the adapter cannot be used as it was scored."""
    fmt = runtime.evaluate.causal
    if fmt is None:
        return {}
    return {"template": fmt.template, "causal_eval": runtime.evaluate.mode,
            "answer_words": dict(zip(runtime.task.label_names, fmt.label_words, strict=True))}


def _prompting_section(metrics: dict) -> str:
    """How to prompt the adapter and read its answer, as the search scored it (causal-LM tasks only)."""
    if "template" not in metrics:
        return ""
    words = metrics["answer_words"]
    shown = "\n".join(f"| {label!r} | {word!r} |" for label, word in list(words.items())[:50])
    more = f"\n\n({len(words) - 50} more in training.yaml's task)" if len(words) > 50 else ""
    if metrics["causal_eval"] == "rank":
        scoring = ("Accuracy ranks the answer words: the predicted label is the one whose word (its tokens, after the "
                   "prompt and a space) has the highest summed log-probability.")
    else:
        stop = ("stopping at the end-of-sequence token" if metrics["generate_stops_at_eos"] else
                "which is where an answer ends (this tokenizer has no end-of-sequence token)")
        scoring = (f"Accuracy generates greedily, at most {metrics['generate_max_new_tokens']} new "
                   f"token{'s' * (metrics['generate_max_new_tokens'] != 1)}, {stop} (`max_new_tokens="
                   f"{metrics['generate_max_new_tokens']}` gives the same answers), and compares the answer with the "
                   "row's word after normalizing both (case folded, punctuation dropped, spaces collapsed).")
    pairs = "text_pair" in template_fields(metrics["template"])
    fields = "`{text}` is the row's text" + (", `{text_pair}` its second text" if pairs else "")
    return f"""
## Prompting

Each row was given as this prompt ({fields}), followed by a space and the answer:

```
{metrics['template']}
```

| label | answer word |
|---|---|
{shown}{more}

{scoring}
"""


def _labels_row(label_names: list[str] | None) -> str:
    """Which class each output of the head is: the order the user's labels were sorted in, nowhere else written."""
    if not label_names:
        return ""
    shown = ", ".join(f"{i}: {name!r}" for i, name in enumerate(label_names[:50]))
    return f"| labels (head output index: label) | {shown}{', ...' if len(label_names) > 50 else ''} |\n"


def _error_note(metrics: dict) -> str:
    if "val_rows" not in metrics:
        return ""
    return f" (standard error {metrics['val_accuracy_standard_error']:.4f} on {metrics['val_rows']} rows)"


def _confirmed_rows(number: int, confirmation: list[dict]) -> str:
    """The trial's confirmation runs, when it had them: what retraining it with another seed gives."""
    mine = next((c for c in confirmation if c["trial"] == number), None)
    if mine is None:
        return ""
    runs = len(mine["runs"])
    return (f"| validation accuracy over {runs} seeds (mean, sd) | {mine['val_accuracy_mean']:.4f}, "
            f"{mine['val_accuracy_sd']:.4f} |\n| forgetting over {runs} seeds (mean) | {mine['forgetting_mean']:.4f} |\n")


def _load_note(method: str, base_model: Any) -> str:
    """What plain peft does differently from how the adapter was trained and scored, if anything."""
    if method != "prompt" or family(base_model) == "bert":
        return ""
    return ("\n\nPrompt tuning on a decoder: peft drops position ids, so with plain peft a left-padded row's score "
            "depends on its batch's padding. autopeft trained and scored it with positions counted from each "
            "row's start: load with `autopeft.adapter_io.load(...)` (the same call as above, from autopeft), or "
            "after peft's load call `autopeft.methods.prompt.count_positions_from_row_starts(model)`, or score "
            "rows one at a time.")


def load_line(peft_backed: bool, task_type: str = "classification", num_labels: int = 0) -> str:
    base = "AutoModelForCausalLM.from_pretrained(BASE)" if task_type == "causal_lm" else \
        f"AutoModelForSequenceClassification.from_pretrained(BASE, num_labels={num_labels or 'N'}, " \
        "ignore_mismatched_sizes=True)"  # a base whose own head has another number of classes loads too
    if peft_backed:
        return f"Load (peft only): `PeftModel.from_pretrained({base}, THIS_FOLDER)`"
    return f"Load (autopeft's own method, not in peft): `autopeft.adapter_io.load({base}, Path(THIS_FOLDER))`"
