"""The Optuna study and the objective. The base model and tokenized data load once per process; every
trial deep-copies the pristine base, attaches its adapter, trains, evaluates, probes and logs."""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import gc
import hashlib
import math
import shutil
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from torch import nn

from autopeft import adapter_io, interrupt, memory, methods
from autopeft import study as studies
from autopeft.budget import ANALYTIC_UNDER, BudgetGate
from autopeft.config import SearchConfig, absolute_if_local, format_bytes, tracking_store_problem
from autopeft.data import (
    TaskData,
    TokenizedSplit,
    eval_positions_limited,
    has_segment_embeddings,
    load_eval_split,
    load_task,
    tokenize,
    with_eval_answers,
)
from autopeft.errors import ConfigError, RareClassError, TrialFailed, first_line
from autopeft.evaluate import Evaluator
from autopeft.models import (
    count_parameters,
    family,
    is_encoder,
    load_causal_lm,
    load_classifier,
    model_fingerprint,
    position_table_rows,
)
from autopeft.probes import ProbeContext, ProbeSet, build_probes, default_probes, probe_problems
from autopeft.recipe import write_recipe
from autopeft.sources import Columns
from autopeft.space import TRAINING_PARAMS, SearchSpace, TrialParams, load_space
from autopeft.stopping import SearchStops
from autopeft.tracking import Tracker
from autopeft.train import (
    LossFn,
    TrainResult,
    TrainSettings,
    causal_lm_loss,
    classification_loss,
    fit,
    require_finite_weights,
)
from autopeft.verbalizer import (
    causal_format,
    decoded_answers_problem,
    default_label_words,
    default_template,
    generated_answers_problem,
    label_words_problem,
    ranked_answers_problem,
    tokenize_causal,
    unmatchable_answer_problem,
)


@dataclass
class Runtime:
    """What every trial of this process shares: loaded once, never modified by a trial."""

    config: SearchConfig
    space: SearchSpace | None  # None when one known configuration is trained (autopeft train)
    task: TaskData
    tokenizer: Any
    base_model: nn.Module
    train: TokenizedSplit
    validation: TokenizedSplit
    test: TokenizedSplit
    probes: ProbeSet
    evaluate: Evaluator  # accuracy on a split, as this task measures it (head argmax or label-word answer)
    loss_fn: LossFn
    method_task_type: str  # peft's task type: SEQ_CLS or CAUSAL_LM
    base_scores: dict[str, float] = field(default_factory=dict)  # the untouched base model's probe scores
    budget_gate: BudgetGate = field(default_factory=BudgetGate)  # remembers traced memory estimates
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @functools.cached_property
    def split_fingerprints(self) -> dict[str, str]:
        """The fingerprint (a hash of the rows) of each split a trial trains or is scored on (test is the
        export's): what a recipe records to tell a retrain on other data."""
        used = {"train": self.task.train, "validation": self.task.validation, "ood": self.task.ood}
        return {name: split.fingerprint() for name, split in used.items() if split is not None}

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def longest_row(self) -> int:
        """Tokens in the longest training row: the batch length memory estimates and evaluation limits are for."""
        return max(self.train.lengths())

    @functools.cached_property
    def longest_input(self) -> int:
        """Tokens in the longest row the model is ever given: training, evaluation (test at export) and probes. A
        causal LM's evaluation puts any answer after a row's prompt (ranking every label word, or generating up
        to the longest and an end token): its rows are counted with the longest answer again, an upper bound.
        Once per process: the runtime never changes."""
        return max(self.longest_task_input, self.probes.longest_input())

    @functools.cached_property
    def longest_task_input(self) -> int:
        """Tokens in the longest task row the model is given, with a causal LM's answer (see longest_input)."""
        return max(max(split.lengths(), default=0) + self.answer_tokens
                   for split in (self.train, self.validation, self.test))

    @property
    def answer_tokens(self) -> int:
        """Tokens a causal LM's evaluation may put after a prompt: the longest answer and an end token (0 with a
        classification head)."""
        causal = self.evaluate.causal
        return max(len(a) for a in causal.answer_ids) + 1 if causal is not None else 0


def ood_columns(config: SearchConfig) -> Columns:
    """The --ood-task's columns: the task's, except where an --ood-*-column option names another."""
    return Columns(config.ood_text_column or config.text_column, config.ood_label_column or config.label_column,
                   config.ood_text_pair_column or config.text_pair_column, option_prefix="--ood-")


def prepare_runtime(config: SearchConfig, space: SearchSpace | None = None) -> Runtime:
    columns = Columns(config.text_column, config.label_column, config.text_pair_column)
    open_answers = config.task_type == "causal_lm" and config.causal_eval == "generate"
    try:
        task = load_task(config.task, seed=config.seed, train_size=config.train_size,
                         val_size=config.val_size, test_size=config.test_size, columns=columns, open_answers=open_answers)
    except RareClassError as exc:
        if config.task_type != "causal_lm" or open_answers:
            raise
        raise RareClassError(f"{exc}; if the labels are free answers (question answering), --causal-eval generate "
                             "scores them as such and splits them at random") from None
    if config.ood_task:
        ood = ood_columns(config)
        if open_answers:  # before the answer format is built from the label names
            task = with_eval_answers(task, config.ood_task, ood)
        task = replace(task, ood=load_eval_split(config.ood_task, label_names=task.label_names, columns=ood,
                                                 max_rows=config.test_size, seed=config.seed,
                                                 open_answers=open_answers))
    loaded = _load_for_task(config, task)
    base_model, tokenizer, tokenize_split, evaluator = loaded
    base_model.eval()
    for param in base_model.parameters():  # the shared copy is never trained
        param.requires_grad_(False)
    splits = {name: tokenize_split(split) for name, split in task.splits().items()}
    ood = tokenize_split(task.ood) if task.ood is not None else None
    probes = _probes(config, task, base_model, tokenizer, evaluator, splits, ood)
    causal = config.task_type == "causal_lm"
    runtime = Runtime(config, space, task, tokenizer, base_model, splits["train"], splits["validation"],
                      splits["test"], probes, evaluator, causal_lm_loss if causal else classification_loss,
                      "CAUSAL_LM" if causal else "SEQ_CLS")
    _check_positions(runtime)
    with scoring_base(runtime):
        runtime.base_scores = probes.fit_base(base_model, runtime.device, cache_file=probe_cache(config),
                                              cache_key=probe_cache_key(config, task, runtime.device))
    return runtime


def _check_positions(runtime: Runtime) -> None:
    """Rows longer than the model's position table stop the first forward pass with an indexing error: said
    before it, in one line, with the --max-length that fits (a causal LM's answers come on top of it)."""
    rows, longest = position_table_rows(runtime.base_model), runtime.longest_input
    if rows is None or longest <= rows:
        return
    config = runtime.config
    own = runtime.probes.too_long(rows)  # texts cut at a probe's own length: a shorter --max-length cannot help
    if own:
        needs = ", ".join(f"{name} {tokens}" for name, tokens in own.items())
        raise ConfigError([(f"--probes: {config.model} has {rows} positions, fewer than the tokens of these probes' own "
                            f"texts, which --max-length does not shorten ({needs}); choose other probes with --probes")])
    fits = rows - runtime.answer_tokens
    raise ConfigError([(f"--max-length: {config.max_length} lets rows reach {longest} tokens, but {config.model} has "
                       f"{rows} positions; use --max-length {fits} or less")])


@contextlib.contextmanager
def scoring_base(runtime: Runtime) -> Iterator[nn.Module]:
    """The shared base model stays on the CPU, and each trial copies it to the device; to be scored itself it
    moves there for the while and back after, so the GPU never holds it beside a trial's copy. Under a
    memory budget it is scored in batches no larger than the space's smallest training micro-batch."""
    model = runtime.base_model
    home = next(model.parameters()).device
    model.to(runtime.device)
    try:
        with eval_positions_limited(eval_positions(runtime)):
            yield model
    finally:
        model.to(home)


def probe_cache(config: SearchConfig) -> Path:
    return Path(config.artifacts_dir) / config.study / "probe-base.pt"


PROBE_SCORING = 2  # raised when a probe scores differently: 2, the perplexity no longer scores tokens after padding


def probe_cache_key(config: SearchConfig, task: TaskData, device: torch.device) -> str:
    """What the cached base scores were computed from: another key computes them again. A causal LM's answer
    format (words, template, accuracy mode) changes its accuracy probes' scores as the data does, and another
    kind of device rounds them differently (a CPU's base read from a GPU's trials as forgetting that is not 0)."""
    split, model = task.describe(), model_fingerprint(config.model)  # weights saved again at its path: another model
    # The default words are the label names (thousands, for open answers: hashed)
    words = hashlib.sha256("\n".join(config.label_words or task.label_names).encode()).hexdigest()[:16]
    ood = absolute_if_local(config.ood_task)  # a worker reads it from the study's record: absolute
    return (f"{model}|{config.seed}|{config.task_type}|{config.max_length}|{ood}|"
            f"{split['train_fingerprint']}|{split['validation_fingerprint']}|{split.get('ood_fingerprint')}|"
            f"words {words}|{config.template!r}|{config.causal_eval}|scoring {PROBE_SCORING}|{device.type}")


def refuse_encoder(name: str, model: nn.Module) -> None:
    """An encoder's attention sees the answer it is asked to predict: as a causal LM, its loss and scores would
    mean nothing."""
    if is_encoder(model):
        raise ConfigError([(f"--task-type causal_lm: {name} is an encoder (bert); use a decoder, or --task-type "
                            "classification")])


def _load_for_task(config: SearchConfig, task: TaskData) -> tuple[nn.Module, Any, Any, Evaluator]:
    """The base model, its tokenizer, how a split is tokenized, and how accuracy is measured."""
    if config.task_type == "causal_lm":
        model, tokenizer = load_causal_lm(config.model, seed=config.seed, trust_remote_code=config.trust_remote_code)
        refuse_encoder(config.model, model)
        words = list(config.label_words or default_label_words(task.label_names))
        problem = label_words_problem(words, task.label_names)
        if config.causal_eval == "generate":  # the user's words must differ once normalized; open answers may not
            problem = problem or (generated_answers_problem(words) if config.label_words else
                                  unmatchable_answer_problem(words, _label_words_source(config)))
        if problem:
            raise ConfigError([problem])
        template = config.template or default_template(task.train.pairs is not None)
        source = _label_words_source(config)
        fmt = causal_format(tokenizer, words, template, source=source)
        if config.causal_eval == "generate" and config.label_words:
            problem = decoded_answers_problem(fmt, tokenizer)
            if problem:
                raise ConfigError([problem])
        evaluator = Evaluator(int(tokenizer.pad_token_id), config.eval_batch_size, causal=fmt,
                              mode=config.causal_eval, tokenizer=tokenizer)  # type: ignore[arg-type]
        return model, tokenizer, lambda split: tokenize_causal(split, tokenizer, config.max_length, words,
                                                               template, source=source), evaluator
    model, tokenizer = load_classifier(config.model, len(task.label_names), seed=config.seed,
                                       trust_remote_code=config.trust_remote_code)
    segments = has_segment_embeddings(model)
    return model, tokenizer, lambda split: tokenize(split, tokenizer, config.max_length, segments=segments), \
        Evaluator(int(tokenizer.pad_token_id), config.eval_batch_size)


def _probes(config: SearchConfig, task: TaskData, base_model: nn.Module, tokenizer: Any, evaluator: Evaluator,
            splits: dict[str, TokenizedSplit], ood: TokenizedSplit | None) -> ProbeSet:
    decoder = family(base_model) != "bert"
    names = config.probes or default_probes(decoder=decoder, has_ood=ood is not None)
    problems = probe_problems(names, decoder=decoder, has_ood=ood is not None)
    if problems:
        raise ConfigError(problems)
    context = ProbeContext(tokenizer, seed=config.seed, evaluate=evaluator, train=splits["train"],
                           validation=splits["validation"], ood=ood, max_length=config.max_length)
    return build_probes(names, context)


def load_trained(runtime: Runtime, adapter: Path) -> nn.Module:
    """A fresh copy of the pristine base with a saved trial's adapter, on the device trials run on, to score."""
    return adapter_io.load(copy.deepcopy(runtime.base_model), adapter).to(runtime.device).eval()


def build_model(runtime: Runtime, params: TrialParams) -> nn.Module:
    """A fresh copy of the pristine base with this trial's adapter attached (only the adapter trains)."""
    model = copy.deepcopy(runtime.base_model)
    for param in model.parameters():
        param.requires_grad_(True)  # peft freezes what the method does not train
    context = methods.MethodContext(runtime.method_task_type, runtime.config.max_steps)
    return adapter_io.attach(model, params.method, params.method_params, context)


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
    eval_seconds: float  # validation accuracy and the forgetting probe (intermediate evaluations included)
    intermediate: list[tuple[int, float]]  # (step, accuracy on a slice of validation spread over it)
    measured_peak_bytes: int | None  # CUDA: max_memory_allocated over the trial; CPU, budgeted: measure_memory
    probe_scores: dict[str, float] = field(default_factory=dict)  # every probe's metrics (forgetting included)


def target_device(runtime: Runtime) -> torch.device:
    """The device the budget is for: --device when planning for another machine, else where we train."""
    return torch.device(runtime.config.device) if runtime.config.device else runtime.device


# Training settings that change a step's memory (the learning rate, schedule and seed do not).
MEMORY_SETTINGS = ("optimizer", "precision", "micro_batch_size", "grad_accum_steps", "gradient_checkpointing",
                   "max_grad_norm", "momentum")


def estimate_memory(runtime: Runtime, model: nn.Module, params: TrialParams) -> memory.MemoryEstimate:
    """Peak bytes of one training step; with a budget, the estimate autopeft.budget chooses to decide. Without
    one, the analytic estimate, unless memory is an objective: that ranks methods, and the analytic estimate
    gives every method the same activations (prompt tuning's longer rows ranked it lightest)."""
    options = _trace_options(runtime)
    seq_len = options["seq_len"]  # the longest batch sets the peak
    settings = train_settings(params, max_steps=runtime.config.max_steps, seed=0)  # defaults fill the gaps
    analytic = memory.estimate(model, optimizer=settings.optimizer, precision=settings.precision,
                               micro_batch_size=settings.micro_batch_size, seq_len=seq_len + virtual_tokens(params),
                               gradient_checkpointing=settings.gradient_checkpointing,
                               task_type=runtime.method_task_type)  # a causal LM's logits span its vocabulary
    if runtime.config.memory_budget is None:
        return traced_estimate(runtime, params) if "memory" in runtime.config.objectives else analytic
    memory_settings = tuple(getattr(settings, name) for name in MEMORY_SETTINGS)
    key = (params.method, repr(sorted(params.method_params.items())), memory_settings, seq_len)
    family = (params.method, tuple(v == 0 if isinstance(v, float) else v for v in memory_settings),
              _memory_shape(params))  # a searched clipping norm or momentum would part every configuration
    args = (runtime.base_model, params.method, params.method_params, settings)
    return runtime.budget_gate.decide(
        analytic, runtime.config.memory_budget, key, family,
        trace=lambda: memory.estimate_traced(*args, **options),
        quick=[lambda: memory.estimate_extrapolated(*args, **options, through="forward"),
               lambda: memory.estimate_extrapolated(*args, **options, through="backward")])


def _memory_shape(params: TrialParams) -> tuple[tuple[str, Any], ...]:
    """What, besides the training settings, sets how far the analytic estimate is from the trace: the method's
    choices (target modules, placement, ...) and whether each real-valued parameter is 0 (dropout keeps a copy of
    each adapted input), not its sizes (rank, tokens). Within one method, optimizer and precision the ratio ran
    from 0.83 to 1.44, so calibrating across these rejected configurations whose trace fits."""
    specs = methods.get(params.method).params
    return tuple((name, value if specs[name].kind in ("choice", "bool") else value == 0)
                 for name, value in sorted(params.method_params.items())
                 if name in specs and specs[name].kind != "int")


def traced_estimate(runtime: Runtime, params: TrialParams) -> memory.MemoryEstimate:
    """The full trace of one configuration's training step on this search's model and longest batch."""
    return memory.estimate_traced(runtime.base_model, params.method, params.method_params,
                                  train_settings(params, max_steps=runtime.config.max_steps, seed=0),
                                  **_trace_options(runtime))


def _trace_options(runtime: Runtime) -> dict[str, Any]:
    """What a traced estimate of this search's trials needs besides the configuration."""
    return {"seq_len": runtime.longest_row, "device": target_device(runtime),
            "task_type": runtime.method_task_type, "num_labels": len(runtime.task.label_names),
            "max_steps": runtime.config.max_steps}


def measure_memory(runtime: Runtime, params: TrialParams) -> int | None:
    """The real peak of two steps on full-length batches, on a separate copy (CPU: live tensor bytes), so
    an admitted trial's estimate can be checked. Only with a budget on the CPU (on CUDA the trial's own
    torch.cuda.max_memory_allocated is measured)."""
    if runtime.config.memory_budget is None or runtime.device.type != "cpu" or target_device(runtime).type != "cpu":
        return None
    return memory.measure(build_model(runtime, params), train_settings(params, max_steps=2, seed=0),
                          seq_len=runtime.longest_row, task_type=runtime.method_task_type,
                          num_labels=len(runtime.task.label_names), pad_id=runtime.pad_id,
                          after_step=methods.get(params.method).after_step)


def eval_positions(runtime: Runtime, params: TrialParams | None = None) -> int | None:
    """Under a memory budget, the padded positions an evaluation batch may hold: one training micro-batch of
    the longest rows, the batch a trial's estimate is for (see data.eval_positions_limited). The micro-batch
    is the trial's (`params`); for the base model alone, the smallest the space offers (the lightest trial's)."""
    if runtime.config.memory_budget is None:
        return None
    micro_batch = int(params.training["micro_batch_size"]) if params is not None else \
        smallest_micro_batch(runtime.space)
    return micro_batch * runtime.longest_row


def smallest_micro_batch(space: SearchSpace | None) -> int:
    if space is None:
        return int(TRAINING_PARAMS["micro_batch_size"].default)
    return min(int(size) for method in space.method_names()
               for size in _dim_options("micro_batch_size", space.training_dims_of(method)))


def positions_problem(runtime: Runtime, params: TrialParams) -> str | None:
    """Why a trial's inputs would run off the model's position table (prompt tuning's virtual tokens on top of
    the longest row the model is given), or None. Said before training, in place of an indexing error."""
    added = methods.get(params.method).added_positions
    rows = position_table_rows(runtime.base_model)
    if added is None or rows is None:
        return None
    extra, longest = added(params.method_params), runtime.longest_input
    if longest + extra <= rows:
        return None
    answers = runtime.answer_tokens  # a causal LM's answer follows a prompt of up to --max-length tokens
    # A shorter --max-length helps only if the probe texts cut at their own length fit beside the virtual tokens.
    shortens = rows > extra + answers and runtime.probes.longest_input(own_length_only=True) + extra <= rows
    fixes = [f"--max-length {rows - extra - answers} or less"] if shortens else []
    fixes += [f"num_virtual_tokens {rows - longest} or less"] if rows > longest else []
    what = "a probe text" if runtime.longest_task_input < longest else \
        "a task row with its answer" if answers else "a task row"
    return (f"{params.method}: {extra} virtual tokens + the longest input's {longest} tokens ({what}) need "
            f"{longest + extra} positions; the model has {rows}" + (f": use {' or '.join(fixes)}" if fixes else ""))


INTERMEDIATE_ROWS = 256  # a mid-training check on a slice of validation: cheap, and enough to see a trend


def run_trial(runtime: Runtime, params: TrialParams, *, seed: int, on_built: Any = None,
              on_checkpoint: Any = None, checkpoints: tuple[int, ...] | None = None) -> TrialOutcome:
    """Build, check the budget (via `on_built`), train, evaluate and probe one configuration.
    Accuracy on a slice of validation rows spread over the split is measured halfway, or at each of the `checkpoints` steps, and
    it and the score a pruner compares (`Evaluator.progress`) passed to `on_checkpoint(step, accuracy, score)`
    (which may raise optuna.TrialPruned)."""
    start = time.perf_counter()
    problem = methods.get(params.method).problem(runtime.base_model)
    if problem:  # e.g. a method that cannot apply to this architecture: skipped, never crashed
        raise optuna.TrialPruned(f"skipped: {problem}")
    problem = positions_problem(runtime, params)
    if problem:
        raise TrialFailed(problem)
    # The adapter's initial weights and the dropout masks draw on torch's global generator: seeded here, a
    # trial depends on its seed alone, not on what ran before it in the process (earlier trials, exports),
    # so `autopeft train` and export's retraining reproduce any trial of a search, not only the first.
    torch.manual_seed(seed)
    model = build_model(runtime, params).to(runtime.device)
    estimate = estimate_memory(runtime, model, params)
    if on_built is not None:
        on_built(model, estimate)
    trainable, _ = count_parameters(model)
    total = sum(p.numel() for p in runtime.base_model.parameters())
    intermediate: list[tuple[int, float]] = []
    due_at, checking, steps_done = set(checkpoints or (runtime.config.max_steps // 2,)), [0.0], [0]
    subset = runtime.validation.spread(INTERMEDIATE_ROWS)

    def check_progress(step: int, trained: nn.Module) -> None:
        steps_done[0] = step
        if step in due_at:
            require_finite_weights(trained, step)
            began = time.perf_counter()
            accuracy, score = runtime.evaluate.progress(trained, subset, runtime.device)
            intermediate.append((step, accuracy))
            checking[0] += time.perf_counter() - began
            if on_checkpoint is not None:
                on_checkpoint(step, accuracy, score)

    settings = train_settings(params, max_steps=runtime.config.max_steps, seed=seed)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    try:
        with eval_positions_limited(eval_positions(runtime, params)):
            result = fit(model, runtime.train, settings, pad_id=runtime.pad_id, device=runtime.device,
                         loss_fn=runtime.loss_fn, on_step=check_progress,
                         after_step=methods.get(params.method).after_step)
            eval_start = time.perf_counter()
            val_accuracy = runtime.evaluate(model, runtime.validation, runtime.device)
            probe_scores = runtime.probes.score(model, runtime.device, measured={"val_accuracy": val_accuracy})
    except BaseException as exc:  # a failed or interrupted trial's steps still count against a step budget
        exc.steps_trained = steps_done[0]
        raise
    eval_seconds = time.perf_counter() - eval_start + checking[0]
    # CUDA: the whole trial's peak (training, its evaluations and probes), what the budget promises to bound
    measured = torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda" else \
        measure_memory(runtime, params)
    end = time.perf_counter()
    return TrialOutcome(model, result, val_accuracy, probe_scores["forgetting"], trainable, total, estimate,
                        end - start, eval_seconds, intermediate, measured, probe_scores)


def failure(exc: BaseException) -> str:
    """Why a trial, or `autopeft train`'s run, failed, in one line (a traceback is kept apart)."""
    if isinstance(exc, TrialFailed):
        return exc.reason
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    message = first_line(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return f"out of memory: {message}"
    return message if message == type(exc).__name__ else f"{type(exc).__name__}: {message}"


class Objective:
    """Optuna objective: one trial -> (validation accuracy, forgetting). Failures become trial states."""

    def __init__(self, runtime: Runtime, tracker: Tracker, parent_run_id: str) -> None:
        self.runtime = runtime
        self.tracker = tracker
        self.parent_run_id = parent_run_id

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.perf_counter()
        trial.set_user_attr("worker", studies.worker_label())  # this trial's objective began (heartbeats run)
        unneeded = self._wait_for_a_place(trial)  # other workers have completed (or are completing) the study
        if unneeded:
            trial.study.stop()
            trial.set_user_attr("prune_reason", unneeded)  # the trials table shows it
            raise optuna.TrialPruned(unneeded)
        # A dead worker's configuration queued while this trial waited for its place runs next, instead (a retry
        # itself runs: it is the configuration to keep).
        if "retry_of" not in trial.user_attrs and studies.retry_waiting(trial.study):
            reason = "not needed: a dead worker's configuration runs again in its place"
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)
        params, seed, run_id = self._begin(trial)
        try:
            outcome = run_trial(self.runtime, params, seed=seed,
                                on_built=lambda model, est: self._check_budget(trial, est),
                                on_checkpoint=lambda step, acc, score: self._report(trial, run_id, step, acc, score),
                                checkpoints=studies.pruner_checkpoints(self.runtime.config))
        except optuna.TrialPruned as pruned:
            self.tracker.end_trial_run(run_id, "PRUNED", str(pruned))
            raise
        except (TrialFailed, torch.OutOfMemoryError) as exc:
            trial.set_user_attr("steps_trained", getattr(exc, "steps_trained", 0))
            # The configuration's own failure (positions, a non-finite loss, an optimizer or precision this
            # machine lacks) fails it again; out of memory may pass once other processes let go of the device.
            trial.set_user_attr("configuration_failed", isinstance(exc, TrialFailed))
            self._fail(trial, run_id, failure(exc))
        except Exception as exc:  # an unexpected error in one configuration must not end the search
            if interrupt.REQUESTED.is_set():  # a Ctrl-C that a library turned into an ordinary error
                self._interrupted(trial, run_id, exc)
                raise KeyboardInterrupt from exc
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            trial.set_user_attr("steps_trained", getattr(exc, "steps_trained", 0))
            self._fail(trial, run_id, failure(exc))
        except BaseException as exc:  # Ctrl-C: close the run so the store holds no RUNNING trial
            self._interrupted(trial, run_id, exc)
            raise
        values = self._values(outcome)
        trial.set_user_attr("steps_trained", len(outcome.train.losses))  # spent, whatever happens next
        if not all(math.isfinite(v) for v in (values if isinstance(values, tuple) else (values,))):
            trial.set_user_attr("configuration_failed", True)
            self._fail(trial, run_id, f"non-finite score: validation accuracy {outcome.accuracy}, "
                                      f"forgetting {outcome.forgetting}")  # Optuna would fail it without a word
        self._record_or_fail(trial, run_id, outcome, started)
        return values

    def _begin(self, trial: optuna.Trial) -> tuple[TrialParams, int, str]:
        """Draw the configuration and open its MLflow run; a Ctrl-C meanwhile is the trial's reason."""
        config = self.runtime.config
        with _interrupted_before_its_run(trial):
            assert self.runtime.space is not None
            params = self.runtime.space.suggest(trial)
            seed = config.seed + trial.number
            trial.set_user_attr("params", params.flat())  # exactly what is built below
            trial.set_user_attr("seed", seed)
            if config.sampler == "grid":
                _skip_if_tried(trial, params.flat())
            run_id = self.tracker.start_trial_run(self.parent_run_id, config.study, trial.number,
                                                  {**params.flat(), "seed": seed})
        trial.set_user_attr("mlflow_run_id", run_id)
        return params, seed, run_id

    def _record_or_fail(self, trial: optuna.Trial, run_id: str, outcome: TrialOutcome, started: float) -> None:
        """`_record`, where saving or logging a trained trial may fail (a full disk) or be interrupted: the
        trial then fails with its reason and its run is closed, as when training fails."""
        try:
            self._record(trial, run_id, outcome, started)
        except Exception as exc:
            if interrupt.REQUESTED.is_set():  # a Ctrl-C that a library turned into an ordinary error
                self._interrupted(trial, run_id, exc)
                raise KeyboardInterrupt from exc
            trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            shutil.rmtree(self._folder(trial), ignore_errors=True)  # half an adapter would load as a whole one
            self._fail(trial, run_id, f"saving the trained trial failed: {failure(exc)}")
        except BaseException as exc:
            self._interrupted(trial, run_id, exc)
            raise

    def _values(self, outcome: TrialOutcome) -> float | tuple[float, ...]:
        config = self.runtime.config
        if config.objective_mode == "scalar":
            return outcome.accuracy - config.forgetting_weight * outcome.forgetting
        extra = {"memory": float(outcome.measured_peak_bytes or outcome.estimate.total),
                 "trainable_params": float(outcome.trainable)}
        return (outcome.accuracy, outcome.forgetting, *(extra[name] for name in config.objectives[2:]))

    def _report(self, trial: optuna.Trial, run_id: str, step: int, accuracy: float, value: float) -> None:
        """Log the checkpoint (a pruned run keeps it too), then let the pruner judge `value`."""
        trial.set_user_attr("steps_trained", step)
        self.tracker.log_metrics(run_id, {"val_accuracy_intermediate": accuracy, "val_score_intermediate": value},
                                 step=step)
        if self.runtime.config.pruner == "none":
            return
        trial.report(value, step)
        if trial.should_prune():
            reason = f"pruned by {self.runtime.config.pruner} at step {step}: intermediate score {value:.4f}"
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)

    def _wait_for_a_place(self, trial: optuna.Trial) -> str | None:
        """`_unneeded`, and a Ctrl-C during its wait recorded as the trial's reason: the trial (no run of its own yet)
        once failed with none, and the summary's "interrupted:" line left it out."""
        with _interrupted_before_its_run(trial):
            return self._unneeded(trial)

    def _unneeded(self, trial: optuna.Trial) -> str | None:
        """Why this trial is not needed, or None. Wait while running trials that started earlier could still
        complete the study. Each of them completes, or fails on a live worker (which goes on and frees a place),
        or, when its worker died, turns stale after the heartbeat grace period and is failed here. So with
        heartbeats the wait needs no deadline: a fixed one let the last workers leave while a dead worker's trial
        still counted, and the study ended a trial short. Without heartbeats a dead worker's trial never turns
        stale: bounded wait. The step budget counts what running trials will train: workers that all started at
        once overspent it by a trial each."""
        config = self.runtime.config
        deadline = None if studies.has_heartbeats(trial.study) else time.monotonic() + 4 * config.heartbeat_seconds
        while not studies.may_start(trial.study, trial.number, config.trials):
            timed_out = deadline is not None and time.monotonic() > deadline
            if timed_out or studies.completed(trial.study) >= config.trials:
                return "not needed: other workers' trials, done or running, complete the study"
            time.sleep(1.0)
            optuna.storages.fail_stale_trials(trial.study)
            studies.fail_unstarted_trials(trial.study, grace_seconds=3 * config.heartbeat_seconds)
        budget = config.max_total_steps
        if budget is not None and studies.steps_committed(trial.study, trial.number, config.max_steps) + config.max_steps > budget:
            return "not needed: what is left of the training-step budget is spent or taken by running trials"
        return None

    def _check_budget(self, trial: optuna.Trial, estimate: memory.MemoryEstimate) -> None:
        budget = self.runtime.config.memory_budget
        trial.set_user_attr("memory_estimate", estimate.as_dict())
        if budget is None:
            return
        trial.set_constraint("memory", estimate.total - budget)
        if estimate.total > budget:
            reason = (f"estimated peak {estimate.describe()} exceeds the budget of {format_bytes(budget)} "
                      f"({estimate.level} estimate)")
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)

    def _interrupted(self, trial: optuna.Trial, run_id: str, exc: BaseException) -> None:
        if hasattr(exc, "steps_trained") or "steps_trained" not in trial.user_attrs:  # spent: a step budget counts them
            trial.set_user_attr("steps_trained", getattr(exc, "steps_trained", 0))
        trial.set_user_attr("fail_reason", "interrupted")  # whatever a library turned the Ctrl-C into
        self.tracker.end_trial_run(run_id, "FAIL", "interrupted")

    def _fail(self, trial: optuna.Trial, run_id: str, reason: str) -> None:
        trial.set_user_attr("fail_reason", reason)
        self.tracker.end_trial_run(run_id, "FAIL", reason)
        raise TrialFailed(reason)

    def _folder(self, trial: optuna.Trial) -> Path:
        return Path(self.runtime.config.artifacts_dir) / self.runtime.config.study / f"trial-{trial.number}"

    def _record(self, trial: optuna.Trial, run_id: str, outcome: TrialOutcome, started: float) -> None:
        config = self.runtime.config
        folder = self._folder(trial)
        shutil.rmtree(folder, ignore_errors=True)  # a replaced study's trial of this number left its own files
        adapter_io.save(outcome.model, folder)
        write_recipe(folder / "training.yaml", config, TrialParams.from_flat(trial.user_attrs["params"]),
                     trial.user_attrs["seed"], self.runtime.split_fingerprints)
        for file in (adapter_io.config_file(folder), folder / "training.yaml"):  # small: kept with every run
            self.tracker.log_file(run_id, file)
        self.tracker.log_curve(run_id, "train_loss", outcome.train.losses)
        self.tracker.log_curve(run_id, "learning_rate", outcome.train.learning_rates)
        # Overhead: everything but training steps and evaluation (sampling, adapter build, saving, logging).
        total = time.perf_counter() - started
        overhead = total - outcome.train.seconds - outcome.eval_seconds
        summary = {
            "val_accuracy": outcome.accuracy, "forgetting": outcome.forgetting,
            "trainable_params": outcome.trainable, "trainable_fraction": outcome.trainable / outcome.total,
            "wall_seconds": total, "train_seconds": outcome.train.seconds, "eval_seconds": outcome.eval_seconds,
            "seconds_per_step": outcome.train.seconds / max(1, len(outcome.train.losses)),
            "overhead_seconds": overhead, "overhead_fraction": overhead / total,
            "train_tokens_per_second": outcome.train.tokens_per_second,
            "padding_fraction": 1 - outcome.train.tokens / max(1, outcome.train.positions),
            "final_train_loss": outcome.train.losses[-1], "fp16_overflow_steps": outcome.train.overflow_steps,
            "memory_estimate_bytes": outcome.estimate.total,
            **{f"probe.{k}": v for k, v in outcome.probe_scores.items() if k != "forgetting"},
            **({"memory_measured_bytes": outcome.measured_peak_bytes,
                "memory_estimate_error": outcome.estimate.total / outcome.measured_peak_bytes - 1}
               if outcome.measured_peak_bytes else {}),
        }
        summary["steps_trained"] = len(outcome.train.losses)
        if config.objective_mode == "scalar":  # the value the study optimizes, to sort the dashboard by
            summary["scalar_objective"] = self._values(outcome)
        for key, value in summary.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("adapter_dir", str(folder.resolve()))
        trial.set_user_attr("memory_estimate_level", outcome.estimate.level)  # which estimate: not a metric
        self.tracker.log_metrics(run_id, summary)
        self.tracker.end_trial_run(run_id, "COMPLETE")


# The default LoRA recipe people start from (r 8, alpha 16, q/v, lr 2e-4): a warm-started search tries it
# first, so the search never ends below it.
DEFAULT_RECIPE = {"method": "lora", "lora.r": 8, "lora.alpha": 16.0, "lora.target_modules": "qv",
                  "lora.dropout": 0.0, "lora.use_rslora": False, "learning_rate": 2e-4, "optimizer": "adamw",
                  "precision": "fp32"}


@contextlib.contextmanager
def _interrupted_before_its_run(trial: optuna.Trial) -> Iterator[None]:
    """A Ctrl-C (a KeyboardInterrupt, or what a library turned it into) before the trial has an MLflow run of its
    own: recorded as the trial's reason, with no steps trained."""
    try:
        yield
    except BaseException:
        if interrupt.REQUESTED.is_set():
            trial.set_user_attr("steps_trained", 0)
            trial.set_user_attr("fail_reason", "interrupted")
        raise


def _skip_if_tried(trial: optuna.Trial, flat: dict[str, Any]) -> None:
    """The grid is the product of every method's settings, so grid points that differ only in settings of
    a method the trial does not use are one configuration: train it once. (Pruned, not counted as a trial.)
    One that failed for a reason of its own is not tried again either (it failed the same way once per point of
    the other methods, and the failures ended the search); one that an interruption, a lost worker, memory other
    processes held or a full disk failed is."""
    states = (studies.COMPLETE, optuna.trial.TrialState.RUNNING, studies.FAIL)
    for other in trial.study.get_trials(deepcopy=False, states=states):
        failed = other.user_attrs.get("fail_reason")
        if other.state == studies.FAIL and not other.user_attrs.get("configuration_failed"):
            continue
        if other.number != trial.number and other.user_attrs.get("params") == flat:
            reason = f"same configuration as trial {other.number} (this grid point differs only in another method's settings)"
            reason += f", which failed: {failed}" if other.state == studies.FAIL else ""
            trial.set_user_attr("duplicate_of", other.number)
            trial.set_user_attr("prune_reason", reason)
            raise optuna.TrialPruned(reason)


def warm_start(study: optuna.Study, space: SearchSpace) -> None:
    """Enqueue the default recipe, keeping only the values the space can express."""
    if "lora" not in space.method_names():  # refused before a search starts; a study recorded before that was not
        return
    dims = {d.name: d for d in (space.method, *space.training_dims.values(), *space.method_dims["lora"].values())}
    dims.update(space.training_overrides.get("lora", {}))  # e.g. "learning_rate" -> the dim named lora.learning_rate
    fixed, outside, held = {}, [], []
    for name, value in DEFAULT_RECIPE.items():
        dim = dims.get(name)
        if dim is None or dim.kind == "fixed":  # not searched: the trial runs the space's value, or the default
            used = _unsearched_value(name) if dim is None else dim.value
            if used != value:
                held.append(f"{name} {_shown(used)} instead of {_shown(value)}")
            continue
        if not dim.holds(value):  # off a stepped range's steps too: Optuna would warn and train it anyway
            outside.append(f"{name} {_shown(value)}")
            continue
        fixed[dim.name] = value
    # The label says where the trial is not the recipe, so a user comparing against it is not misled.
    differences = ([f"{', '.join(outside)} (outside the space: sampled)"] if outside else []) + \
        ([f"{', '.join(held)} (not searched by the space)"] if held else [])
    label = "default LoRA recipe" + (f", but for {'; '.join(differences)}" if differences else "")
    study.enqueue_trial(fixed, user_attrs={"warm_start": label})


def _unsearched_value(name: str) -> Any:
    method, dot, param = name.partition(".")
    return methods.get(method).params[param].default if dot else TRAINING_PARAMS[name].default


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SearchSummary:
    study: optuna.Study
    config: SearchConfig
    parent_run_id: str
    stopped_reason: str | None = None  # why the search stopped before its target, if it did
    fallback_uri: str | None = None  # where runs went when the tracking store stopped answering


# Distributions that provide a package under another name: mlflow-skinny is a complete MLflow client.
_PROVIDED_BY = {"mlflow": ("mlflow", "mlflow-skinny")}


def package_versions() -> dict[str, str]:
    """The versions a study's parent run records. A package installed under another distribution's name is
    recorded with that name, a missing one as such: recording versions must never stop a search."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        for distribution in _PROVIDED_BY.get(name, (name,)):
            try:
                found = version(distribution)
            except PackageNotFoundError:
                continue
            return found if distribution == name else f"{found} ({distribution})"
        return "not installed"

    names = ("torch", "transformers", "peft", "optuna", "mlflow", "datasets", "scikit-learn")
    return {f"version.{name}": installed(name) for name in names}


def check_budget_feasible(config: SearchConfig, runtime: Runtime) -> None:
    """When even the lightest configuration the space offers is over the budget, no trial can run: say so
    before anything trains (exit 2) instead of pruning every trial. The analytic estimate clears a budget at
    once only with the gate's margin (it reads up to 52% under the peak: prompt tuning's virtual tokens are not
    in it); only the full trace of each method's lightest configuration refuses one."""
    if config.memory_budget is None or runtime.space is None:
        return
    traced = []
    for label, params, analytic in sorted(_lightest_configurations(runtime), key=lambda light: light[2].total):
        if analytic.total * ANALYTIC_UNDER <= config.memory_budget:
            return
        traced.append((label, traced_estimate(runtime, params)))  # the lightest first: tracing stops at a fit
        if traced[-1][1].total <= config.memory_budget:
            return
    if traced:
        label, fits_least = min(traced, key=lambda pair: pair[1].total)
        raise ConfigError([(f"--memory-budget: {format_bytes(config.memory_budget)} fits no configuration of "
                           f"{config.space}; the lightest ({label}) needs {fits_least.describe()}")])


def _lightest_configurations(runtime: Runtime) -> list[tuple[str, TrialParams, memory.MemoryEstimate]]:
    """Per method (at its lightest parameters in the space) and per precision the space offers: the smallest
    micro-batch and checkpointing when the space offers it, with the optimizer of least state; and its analytic
    estimate. Every precision, not the lowest alone: on the CPU, bf16's autocast keeps 16-bit copies of the
    weights and at small batches needs more than fp32."""
    space = runtime.space
    assert space is not None
    results = []
    for method in space.method_names():
        if methods.get(method).problem(runtime.base_model):
            continue
        dims = space.training_dims_of(method)
        settings = {**params_defaults(), "micro_batch_size": int(min(_dim_options("micro_batch_size", dims))),
                    "gradient_checkpointing": True in _dim_options("gradient_checkpointing", dims)}
        built = _lightest_model(runtime, method, settings)
        if built is None:  # no configuration of it trains at --max-steps (AdaLoRA at 1 step): its trials say why
            continue
        own, model = built
        for precision in dict.fromkeys(_dim_options("precision", dims)):
            at = {**settings, "precision": precision}
            estimates = {opt: _analytic(runtime, model, TrialParams(method, own, {**at, "optimizer": opt}))
                         for opt in _dim_options("optimizer", dims)}
            optimizer = min(estimates, key=lambda opt: estimates[opt].total)
            params = TrialParams(method, own, {**at, "optimizer": optimizer})
            if positions_problem(runtime, params):  # cannot be traced, nor trained: its trials say why
                break
            results.append((f"{method}, micro-batch {at['micro_batch_size']}, {precision}, {optimizer}", params,
                            estimates[optimizer]))
    return results


def _analytic(runtime: Runtime, model: nn.Module, params: TrialParams) -> memory.MemoryEstimate:
    settings = params.training
    return memory.estimate(model, optimizer=settings["optimizer"], precision=settings["precision"],
                           micro_batch_size=settings["micro_batch_size"],
                           seq_len=runtime.longest_row + virtual_tokens(params),
                           gradient_checkpointing=settings["gradient_checkpointing"], task_type=runtime.method_task_type)


def virtual_tokens(params: TrialParams) -> int:
    """The positions a method adds to every row (prompt tuning's virtual tokens), which the analytic estimate
    sizes activations by too: without them it read 3-6x under the trace at 40-80 tokens and admitted trials the
    budget cannot hold."""
    added = methods.get(params.method).added_positions
    return added(params.method_params) if added else 0


def _lightest_model(runtime: Runtime, method: str,
                    settings: dict[str, Any]) -> tuple[dict[str, Any], nn.Module] | None:
    """The space's lightest parameters of `method` and the model built with them; when they break a rule of the
    method (AdaLoRA's target_r and init_r both at their lowest, say), the values the space fixes, then the
    method's defaults. None when none of them can be built."""
    space = runtime.space
    assert space is not None
    candidates = (_lightest_choices(runtime, method, settings, space.lightest_method_params(method)),
                  space.fixed_params(method).method_params, methods.get(method).resolve({}))
    for own in candidates:
        try:
            return own, build_model(runtime, TrialParams(method, own, settings))
        except TrialFailed:
            continue
    return None


def _lightest_choices(runtime: Runtime, method: str, settings: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """`own` with each searched choice that is not a number (target modules, placement, ...) at the one of least
    analytic estimate, one dimension at a time: which is lightest depends on the model, not on the name."""
    assert runtime.space is not None
    for name, dim in runtime.space.method_dims.get(method, {}).items():
        if dim.kind != "categorical" or dim.numeric:
            continue
        sizes = {}
        for choice in dim.choices:
            params = methods.get(method).resolve({**own, name: choice})
            try:
                trial = TrialParams(method, params, settings)
                sizes[choice] = _analytic(runtime, build_model(runtime, trial), trial).total
            except TrialFailed:
                continue
        if sizes:
            own = methods.get(method).resolve({**own, name: min(sizes, key=lambda c: sizes[c])})
    return own


def _dim_options(name: str, dims: dict) -> list:
    """The values a training dimension offers (a range: its low end), or the parameter's default."""
    dim = dims.get(name)
    if dim is None:
        return [TRAINING_PARAMS[name].default]
    return list(dim.choices) if dim.kind == "categorical" else [dim.value] if dim.kind == "fixed" else [dim.low]


def warm_up_tracer(runtime: Runtime) -> float:
    """Before a budgeted search's first trial: a one-block forward and backward of each method of the space
    at each micro-batch size it offers, at the search's sequence length, and one on the meta device (the
    quick estimates'); returns the seconds spent. The fake-tensor tracer caches each operation per shape, and
    the first use of either in a process loads its machinery: seconds that would otherwise land on the first
    trials, rejected ones included."""
    space = runtime.space
    if runtime.config.memory_budget is None or space is None or target_device(runtime).type != "cpu":
        return 0.0
    spent = 0.0
    for method in space.method_names():
        # The warm-up traces the method's defaults: prompt tuning's 20 virtual tokens may overrun the position
        # table where the space's own fewer fit (its trials, if any overrun, fail saying so).
        defaults = TrialParams(method, methods.get(method).resolve({}), {})
        if methods.get(method).problem(runtime.base_model) or positions_problem(runtime, defaults):
            continue
        dims = space.training_dims_of(method)
        options = {"seq_len": runtime.longest_row, "task_type": runtime.method_task_type,
                   "num_labels": len(runtime.task.label_names)}
        sizes = sorted({int(size) for size in _dim_options("micro_batch_size", dims)})
        for size in sizes:
            spent += memory.warm_up(runtime.base_model, method, micro_batch_size=size, **options)
        # The quick estimates' meta-device trace has no per-shape cache: one size warms it.
        spent += memory.warm_up(runtime.base_model, method, micro_batch_size=sizes[0], meta=True, **options)
    return spent


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """The base model, data and libraries loaded before the first trial (some 700k Python objects) live as
    long as the search. Frozen, the garbage collections after each trial and inside the memory tracer's
    traces stop rescanning them: 7.8 s -> 2.1 s of collection in a 100 s budgeted search, and no full
    collection (0.5 s) landing inside a rejected trial."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # collectable again once the search is over


def params_defaults() -> dict[str, Any]:
    return {k: spec.default for k, spec in TRAINING_PARAMS.items()}


def new_search_problems(config: SearchConfig) -> list[str]:
    """Settings a search may not start with, though a study or recipe recorded with them still exports and
    resumes: the probe names (before a model loads; whether one needs a decoder is checked once it has), an
    --ood-task no probe scores, and a step budget no trial fits in."""
    problems = []
    if config.probes:
        problems += probe_problems(config.probes, decoder=None, has_ood=config.ood_task is not None)
        if config.ood_task and "ood_accuracy" not in config.probes:  # the set would load and never be scored
            problems.append(f"--probes: {', '.join(config.probes)} leaves out ood_accuracy, the probe that scores "
                            "--ood-task; add it, or drop --ood-task")
    if config.max_total_steps is not None and config.max_total_steps < config.max_steps:
        problems.append(f"--max-total-steps: {config.max_total_steps} is below --max-steps ({config.max_steps}): no "
                        "trial would fit in it")
    return problems


def check_before_loading(config: SearchConfig) -> SearchSpace:
    """The space, and a resumed study's settings, checked in well under a second: before any model or data loads."""
    space = load_space(config.space)
    problems = new_search_problems(config)
    tracking = tracking_store_problem(config.tracking_uri, storage=config.storage)
    if tracking:
        problems.append(tracking)
    if config.warm_start and "lora" not in space.method_names():  # the recipe could not be its first trial
        problems.append(f"--warm-start: the default recipe is LoRA, and {config.space} searches "
                        f"{', '.join(space.method_names())} only; add lora to its methods, or drop --warm-start")
    if problems:
        raise ConfigError(problems)
    if config.sampler == "grid":
        space.grid()  # a range the grid cannot walk is refused here, before the study exists
    studies.check_settings_before_loading(config, space)
    return space


def run_search(config: SearchConfig, *, progress: Any = None, prepare_only: bool = False,
               space: SearchSpace | None = None) -> SearchSummary:
    """Run (or resume) the study until `config.trials` trials have completed or the timeout passes.
    `prepare_only`: create or resume the study, its MLflow parent run and the base model's scores, and train
    nothing (for workers in other processes, which read the settings recorded here). `space`: what
    `check_before_loading` returned, when the caller ran it already."""
    space = space or check_before_loading(config)
    runtime = prepare_runtime(config, space)  # bad model or data fails here, before anything is written
    refuse_unanswerable_label_words(config, runtime)
    check_budget_feasible(config, runtime)
    make_artifacts_folder(config)  # an unusable folder is refused before the study exists
    on_stale = studies.StaleTrialRetry()
    study = studies.open_study(config, space, runtime.task, on_stale)
    if config.force_new:
        clear_trial_folders(config)
    return run_trials(runtime, study, on_stale, progress=progress, train=not prepare_only)


def refuse_unanswerable_label_words(config: SearchConfig, runtime: Runtime) -> None:
    """Rank mode could never answer a label word whose tokens another's begin with: a new search is refused it
    (a study or recipe recorded before still resumes, exports and trains)."""
    fmt = runtime.evaluate.causal
    if fmt is None or config.causal_eval != "rank" or studies.existing_study(config) is not None:
        return
    problem = ranked_answers_problem(fmt, _label_words_source(config))
    if problem:
        raise ConfigError([problem])


def _label_words_source(config: SearchConfig) -> str:
    """Where a causal task's label words come from, as an error names it."""
    return "--label-words" if config.label_words else f"--task: the labels in column {config.label_column!r}"


def make_artifacts_folder(config: SearchConfig) -> None:
    """The study's folder for adapters and the base model's probe scores."""
    folder = probe_cache(config).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([f"--artifacts-dir: cannot create {folder}: {exc.strerror or exc}"]) from None


def clear_trial_folders(config: SearchConfig) -> None:
    """The adapters of a study that --force-new replaced: the new study's trials reuse their numbers, and an
    export of one found the old trial's adapter at its path (on a machine where the new trial did not run)."""
    for folder in probe_cache(config).parent.glob("trial-*"):
        shutil.rmtree(folder)


def split_params(task: TaskData) -> dict[str, Any]:
    """The split as made, named apart from the settings that asked for it: `split.train_size` is the rows the
    split holds, beside `train_size`, the rows requested (the split's sizes once overwrote the requested ones)."""
    return {f"split.{key}": value for key, value in task.describe().items() if key != "task"}


def run_worker(config: SearchConfig, *, progress: Any = None, run_began: datetime.datetime | None = None) -> SearchSummary:
    """Join an existing study (any machine): its recorded config and space, this worker's stores. `run_began`:
    when the search that started this worker began (its failures in a row count from then; default now)."""
    on_stale = studies.StaleTrialRetry()
    study, joined, space = studies.load_for_worker(config, on_stale)
    runtime = prepare_runtime(joined, space)
    make_artifacts_folder(joined)
    return run_trials(runtime, study, on_stale, progress=progress, run_began=run_began)


def run_trials(runtime: Runtime, study: optuna.Study, on_stale: studies.StaleTrialRetry, *,
               progress: Any = None, train: bool = True, run_began: datetime.datetime | None = None) -> SearchSummary:
    config = runtime.config
    study.sampler = studies.seeded_sampler(config, study, runtime.space)
    study.pruner = studies.make_pruner(config)
    warmed = warm_up_tracer(runtime)
    if warmed:  # recorded, so a benchmark can count it with the rejections it makes cheaper
        study.set_user_attr("tracer_warm_up_seconds", warmed)
    # Also on a resumed study that never had it: --warm-start promises a search that does not end below it. Not on
    # one that already holds its --trials: nothing would run the recipe, left waiting in the study.
    if config.warm_start and runtime.space is not None and not any("warm_start" in t.user_attrs for t in study.trials) \
            and (config.trials == 0 or studies.completed(study) < config.trials) and studies.trial_fits_budget(study, config):
        warm_start(study, runtime.space)
    tracker = Tracker(config.tracking_uri)
    on_stale.tracker = tracker
    parent_attr = studies.parent_run_attr(study, config, holds=tracker.resolve)
    known_parent = study.user_attrs.get(parent_attr)
    parent = tracker.open_study_run(config.study, known_parent,
                                    {**config.public_dict(), **split_params(runtime.task), **package_versions()},
                                    config.space, study.user_attrs.get("space_yaml"))
    study.set_user_attr(parent_attr, parent)  # at once: a search stopped from here on leaves a run a resume reopens
    objective = Objective(runtime, tracker, parent)
    stops = SearchStops(config, study, since=run_began)
    try:
        _record_base_scores(runtime, study, tracker, parent, new_parent=parent != known_parent)
        runtime.probes.save_base(probe_cache(config), probe_cache_key(config, runtime.task, runtime.device))
        with _long_lived_objects_frozen():
            # A resumed study whose step budget is spent, or whose grid is walked, trains nothing more (a walked
            # grid's sampler draws a point again, which was trained as a repeat under a wrong reason).
            grid_walked = isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study)
            if train and stops.remaining > 0 and not stops.step_budget_spent(study) and not grid_walked:
                study.optimize(objective, timeout=config.timeout, catch=(TrialFailed,),
                               callbacks=stops.callbacks() + ([progress] if progress else []), gc_after_trial=True)
        interrupt.check()
    except Exception as exc:  # the parent run is closed either way: the store holds no run left RUNNING
        interrupted = interrupt.REQUESTED.is_set()
        with contextlib.suppress(Exception):  # a store that fails too (a full disk) must not hide the error
            tracker.close_study_run(parent, {"completed_trials": studies.completed(study)},
                                    status="KILLED" if interrupted else "FAILED")
        if not interrupted:
            raise
        raise KeyboardInterrupt from exc
    except KeyboardInterrupt:
        tracker.close_study_run(parent, {"completed_trials": studies.completed(study)}, status="KILLED")
        raise
    tracker.close_study_run(parent, {"completed_trials": studies.completed(study)})
    return SearchSummary(study, config, parent, stops.reason(study) if train else None,
                         tracker.uri if tracker.fell_back else None)


def _record_base_scores(runtime: Runtime, study: optuna.Study, tracker: Tracker, parent: str, *,
                        new_parent: bool) -> None:
    """The untouched base model's validation accuracy and probe scores, computed once per study, and logged to
    each parent run it gets (a worker logging to a store of its own opens one there)."""
    study.set_user_attr("probe_names", runtime.probes.names)  # what a default --probes chose, for a resume to match
    if "base_val_accuracy" not in study.user_attrs:
        with scoring_base(runtime):
            base = runtime.evaluate(runtime.base_model, runtime.validation, runtime.device)
        study.set_user_attr("base_val_accuracy", base)
        study.set_user_attr("base_probe_scores", runtime.base_scores)
    elif not new_parent:
        return
    tracker.log_metrics(parent, {"base_val_accuracy": study.user_attrs["base_val_accuracy"],
                                 **{f"base_{k}": v for k, v in study.user_attrs.get("base_probe_scores", {}).items()}})
