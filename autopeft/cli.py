"""The `autopeft` command: parse options, build configs, call the API, print with rich. Nothing else."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from autopeft.config import (
    DEFAULT_MODEL,
    DEFAULT_SPACE,
    DEFAULT_TASK,
    SearchConfig,
    existing_mlflow_store_problem,
    format_bytes,
    parse_memory,
    redact_url,
    sqlite_file,
    tracking_store_problem,
    tracking_uri_problem,
)
from autopeft.errors import AutopeftError, ConfigError, TrialFailed, first_line

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

app = typer.Typer(add_completion=False, no_args_is_help=False, help=(
    "Find the best parameter-efficient fine-tuning configuration for a task, under a memory budget."))
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI get full tables
err = Console(stderr=True)
_state = {"debug": False}
T = TypeVar("T")


def _quiet_libraries() -> None:
    """Our table and progress lines are the output; library chatter would drown them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by our own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fail_stale_trials.*")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # bitsandbytes (imported by peft when installed) warns on every start about an optional CPU kernel.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # Without network, the hub client logs each retry of a dataset name that is not a local path; the one
    # error line that follows says it all.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub is first imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a "View run" link per run on a server
    warnings.formatwarning = _plain_ours  # the same function each time: a process running many commands
    # in-process (a notebook) wrapped the previous one once per command, until a warning overflowed the stack


_LIBRARY_FORMAT = warnings.formatwarning


def _plain_ours(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    """Our own warnings are messages to the user: one line, without the file and source line."""
    if category.__module__.startswith("autopeft"):
        return f"warning: {message}\n"
    return _LIBRARY_FORMAT(message, category, *args, **kwargs)


def _fail(*problems: str, code: int = 2) -> NoReturn:
    """Report problems as one line each on stderr and exit: 2 for bad input (nothing has been written)."""
    for line in problems:
        err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _guard(call: Callable[[], T]) -> T:
    """Turn user-facing errors into one line per problem on stderr and exit code 2."""
    try:
        return call()
    except AutopeftError as exc:
        if _state["debug"]:
            traceback.print_exc()
        _fail(*str(exc).splitlines())


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for errors.")] = False) -> None:
    _state["debug"] = debug
    _quiet_libraries()


def _where(url: str) -> str:
    """An absolute path for a local sqlite store; any other URL without its password."""
    return str(Path(url.removeprefix("sqlite:///")).resolve()) if url.startswith("sqlite:///") else redact_url(url)


@app.command()
def search(
    model: Annotated[str, typer.Option(help="Hub id, local model folder, or packaged:<name>.")] = DEFAULT_MODEL,
    task: Annotated[str, typer.Option(help="packaged:rotten_tomatoes, a CSV/JSONL/Parquet file, a folder of train/validation/test files, or a hub dataset (name or name:config).")] = DEFAULT_TASK,
    space: Annotated[Path, typer.Option(help="Search-space YAML file.")] = DEFAULT_SPACE,
    trials: Annotated[int, typer.Option(help="Completed trials the study should hold (a resumed study counts its own; 0 only creates the study for workers).")] = 6,
    timeout: Annotated[float | None, typer.Option(help="Stop starting new trials after this many seconds.")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Peak training memory allowed per trial, e.g. 8GiB; configurations estimated above it are pruned before training.")] = None,
    device: Annotated[str | None, typer.Option(help="Device the memory budget is for: cuda or cpu (default: where this search trains; cuda works for planning on a CPU-only machine).")] = None,
    study: Annotated[str, typer.Option(help="Study name; running again with the same name resumes it.")] = "default",
    storage: Annotated[str, typer.Option(help="Optuna storage URL (sqlite:///..., postgresql://...).")] = "sqlite:///autopeft.db",
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI (sqlite:///..., http://host:port).")] = "sqlite:///mlflow.db",
    artifacts_dir: Annotated[Path, typer.Option(help="Where each trial's trained adapter is saved.")] = Path("autopeft-artifacts"),
    seed: Annotated[int, typer.Option(help="Seeds the sampler, the data split and every trial.")] = 0,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps per trial.")] = 150,
    train_size: Annotated[int, typer.Option(help="Training rows (stratified sample).")] = 4000,
    val_size: Annotated[int, typer.Option(help="Validation rows, used to score trials.")] = 1000,
    test_size: Annotated[int, typer.Option(help="Held-out test rows, scored once at export.")] = 1000,
    max_length: Annotated[int, typer.Option(help="Tokens per row after truncation (a causal_lm task: prompt and answer together).")] = 128,
    workers: Annotated[int, typer.Option(help="Local worker processes sharing the study (1 = run in this process). With sqlite, more than a few workers contend for its file lock; use PostgreSQL for many.")] = 1,
    max_consecutive_failures: Annotated[int, typer.Option(help="Stop after this many failed trials in a row.")] = 5,
    heartbeat: Annotated[int, typer.Option(help="Seconds between trial heartbeats; a trial silent for 3x this long is failed and its configuration retried.")] = 10,
    force_new: Annotated[bool, typer.Option(help="Replace an existing study of this name instead of refusing a different setup.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a hub model to run its own Python code (off by default).")] = False,
    objectives: Annotated[str, typer.Option(help="Pareto objectives: accuracy,forgetting, optionally followed by memory or trainable_params.")] = "accuracy,forgetting",
    objective_mode: Annotated[str, typer.Option(help="pareto (multi-objective) or scalar (accuracy - forgetting-weight x forgetting; needed for pruning).")] = "pareto",
    forgetting_weight: Annotated[float | None, typer.Option(help="Scalar mode only: weight of forgetting (default 1).")] = None,
    sampler: Annotated[str, typer.Option(help="tpe, nsga2, gp, random or grid (grid needs list-valued dimensions); seeded by --seed.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="Scalar mode only: hyperband, successive-halving, median or none; compares how well the model separates the classes on validation rows (ROC AUC; a causal LM: accuracy) from --prune-after steps on.")] = "none",
    prune_after: Annotated[int | None, typer.Option(help="Steps a trial trains before the pruner may stop it (default: half of --max-steps). Lower saves more on long trials, but too early every configuration still looks alike.")] = None,
    max_total_steps: Annotated[int | None, typer.Option(help="Optimizer steps for all trials together: a trial starts only if its --max-steps fit in what is left (pruned and failed trials count what they trained).")] = None,
    warm_start: Annotated[bool, typer.Option(help="Try the default LoRA recipe (r 8, alpha 16, q/v, lr 2e-4) first, so the search never ends below it.")] = False,
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    text_pair_column: Annotated[str | None, typer.Option(help="Column holding a second text (sentence pairs).")] = None,
    task_type: Annotated[str, typer.Option(help="classification (a head on the model) or causal_lm (a decoder answers with a label word).")] = "classification",
    label_words: Annotated[str | None, typer.Option(help="causal_lm: comma-separated answer word per label, in the labels' sorted order (numbers numerically; the summary prints the pairing; default: the label names).")] = None,
    template: Annotated[str | None, typer.Option(help="causal_lm: prompt template with {text} (and {text_pair}); \\n in it is a newline, as in the default 'Text: {text}\\nLabel:'.")] = None,
    causal_eval: Annotated[str, typer.Option(help="causal_lm accuracy: rank (most likely label word) or generate (greedy answer, exact match).")] = "rank",
    ood_task: Annotated[str | None, typer.Option(help="An out-of-distribution evaluation set (file, folder or hub name) with the same labels.")] = None,
    ood_text_column: Annotated[str | None, typer.Option(help="The --ood-task's text column (default: --text-column).")] = None,
    ood_label_column: Annotated[str | None, typer.Option(help="The --ood-task's label column (default: --label-column).")] = None,
    ood_text_pair_column: Annotated[str | None, typer.Option(help="The --ood-task's second-text column (default: --text-pair-column).")] = None,
    probes: Annotated[str | None, typer.Option(help="Comma-separated probes: linear_probe, representation_drift, perplexity, factual_recall, generalization_gap, ood_accuracy (default: by model kind).")] = None,
) -> None:
    """Run (or resume) a budgeted search and print the trials, the chosen one and where everything is."""
    def build() -> SearchConfig:
        return SearchConfig(model=model, task=task, space=str(space), trials=trials,
                            timeout=timeout, memory_budget=_budget(memory_budget), device=device, study=study,
                            storage=storage,
                            tracking_uri=tracking_uri, artifacts_dir=str(artifacts_dir), seed=seed,
                            max_steps=max_steps, train_size=train_size, val_size=val_size, test_size=test_size,
                            max_length=max_length, max_consecutive_failures=max_consecutive_failures, heartbeat_seconds=heartbeat,
                            force_new=force_new, trust_remote_code=trust_remote_code,
                            objectives=tuple(o.strip() for o in objectives.split(",") if o.strip()),
                            objective_mode=objective_mode, **_scalar_weight(forgetting_weight, objective_mode),
                            sampler=sampler,
                            pruner=pruner, prune_after=prune_after, max_total_steps=max_total_steps, warm_start=warm_start,
                            text_column=text_column, label_column=label_column, text_pair_column=text_pair_column,
                            task_type=task_type, label_words=_csv(label_words, "--label-words"),
                            template=template.replace("\\n", "\n") if template else None,  # as a shell passes it
                            causal_eval=causal_eval, ood_task=ood_task, ood_text_column=ood_text_column,
                            ood_label_column=ood_label_column, ood_text_pair_column=ood_text_pair_column,
                            probes=_csv(probes, "--probes"))

    if workers < 1:
        _fail(f"--workers: {workers} must be at least 1 (1 runs the search in this process)")
    if workers > 1 and trials == 0:
        _fail(f"--trials 0 with --workers {workers}: the workers need a target; give --trials N, or create the "
              "study with --trials 0 alone and start `autopeft worker ... --trials N` yourself")
    config = _guard(build)  # before the heavy imports below: bad flags are refused in well under a second
    from autopeft.search import check_before_loading, run_search
    from autopeft.study import completed_before, strategy_changes, tracking_change

    space = _guard(lambda: check_before_loading(config))  # a bad space is refused before "loading" is announced
    changes = strategy_changes(config)
    if changes:
        console.print(f"[yellow]resuming study {config.study} with {', '.join(changes)}[/yellow]")
    moved = tracking_change(config)
    if moved:
        console.print(f"[yellow]resuming study {config.study} with {moved}[/yellow]", soft_wrap=True)
    console.print(f"study [bold]{config.study}[/bold] in {_where(config.storage)}; "
                  f"loading model and data once for all trials ...")
    def run() -> Any:
        if workers > 1:  # the study, its parent run and the base scores; the workers train
            return run_search(config, prepare_only=True, space=space)
        with SearchProgress(config.trials, scalar=config.objective_mode == "scalar",
                            done=completed_before(config)) as progress:
            return run_search(config, progress=progress, space=space)

    summary = _interruptible(run, config)
    failed_workers = []
    if workers > 1 and _work_left(summary.study, config):
        prepared_fallback = summary.fallback_uri  # this process fell back while it created the study's parent run
        summary, failed_workers = _run_local_workers(workers, config)
        summary = dataclasses.replace(summary, fallback_uri=summary.fallback_uri or prepared_fallback)
    elif workers > 1:  # say why no worker was started: each would load the model to run nothing
        from autopeft.stopping import SearchStops

        summary = dataclasses.replace(summary, stopped_reason=SearchStops(config, summary.study).reason(summary.study))
    _print_summary(summary.study, config, summary.stopped_reason, summary.fallback_uri)
    if failed_workers:
        _fail(*failed_workers, code=1)
    if config.trials and summary.stopped_reason and not any(t.state.name == "COMPLETE" for t in summary.study.trials):
        raise typer.Exit(1)  # stopped with nothing to show (every trial failed or was rejected): a script must see it


@app.command()
def worker(
    study: Annotated[str, typer.Option(help="Name of an existing study to join.")],
    storage: Annotated[str, typer.Option(help="Optuna storage URL shared by all workers (postgresql://...).")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking server shared by all workers (http://host:port; default: the one the study was created with).")] = None,
    artifacts_dir: Annotated[Path, typer.Option(help="Where this worker saves trained adapters.")] = Path("autopeft-artifacts"),
    trials: Annotated[int, typer.Option(help="Completed trials the study should reach (0 = what the study was created with).")] = 0,
    timeout: Annotated[float | None, typer.Option(help="Stop starting new trials after this many seconds.")] = None,
    worker_id: Annotated[int | None, typer.Option(help="Distinguishes this worker's sampler seed (default: the process id).")] = None,
    spawned: Annotated[bool, typer.Option(hidden=True, help="Started by `search --workers N`, which prints the summary.")] = False,
    run_began: Annotated[str | None, typer.Option(hidden=True, help="When `search --workers N` began (ISO time): failures in a row count from then.")] = None,
) -> None:
    """Join a study created by `autopeft search` and run its trials; start one per GPU, on any machine."""
    from autopeft.search import run_worker
    from autopeft.study import worker_id_default

    if trials < 0:
        _fail(f"--trials: {trials} must be 0 or more (0: the target the study was created with)")
    config = _guard(lambda: SearchConfig(study=study, storage=storage, tracking_uri=tracking_uri or "",  # "": the study's
                                         artifacts_dir=str(artifacts_dir), trials=trials, timeout=timeout,
                                         worker_id=worker_id if worker_id is not None else worker_id_default()))
    began = datetime.datetime.fromisoformat(run_began) if run_began else None
    summary = _interruptible(lambda: run_worker(config, progress=_progress, run_began=began), config, summary=not spawned)
    done = sum(t.state.name == "COMPLETE" for t in summary.study.trials)
    console.print(f"worker done: the study holds {done} completed trial{'s' * (done != 1)}"
                  + (f"; {summary.stopped_reason}" if summary.stopped_reason else "")
                  + (f"; its runs went to {summary.fallback_uri} (autopeft sync copies them)" if summary.fallback_uri
                     else ""))


def _csv(text: str | None, option: str) -> tuple[str, ...] | None:
    """A comma-separated option's entries; an empty one ('good,', 'a,,b') is refused, not dropped: it would
    shift every later entry onto the wrong label."""
    if text is None or not text.strip():  # "" (an empty shell variable, say): the default
        return None
    parts = tuple(part.strip() for part in text.split(","))
    if not all(parts):
        raise ConfigError([(f"{option}: {text!r} has an empty entry (entry {parts.index('') + 1}); give one "
                           "comma-separated name per entry")])
    return parts


def _scalar_weight(weight: float | None, objective_mode: str) -> dict[str, float]:
    """--forgetting-weight only where it weighs something: a Pareto search keeps forgetting as an objective of its
    own, and silently ignoring the flag there would let a user believe it steered the search."""
    if weight is None:
        return {}
    if objective_mode != "scalar":
        raise ConfigError([(f"--forgetting-weight: {weight} needs --objective-mode scalar (a Pareto search keeps "
                           "forgetting as an objective of its own)")])
    return {"forgetting_weight": weight}


def _budget(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise ConfigError([f"--memory-budget: {exc}"]) from None


def _interruptible(call: Callable[[], T], config: SearchConfig, *, summary: bool = True) -> T:
    """Ctrl-C: the running trial is already recorded as failed ("interrupted"); print what finished (unless
    the process that started this one prints it)."""
    from autopeft import interrupt

    with interrupt.installed():
        try:
            return _guard(call)
        except KeyboardInterrupt:
            pass
    if not summary:
        raise typer.Exit(130)
    import optuna

    from autopeft.study import worker_label

    try:
        study = optuna.load_study(study_name=config.study, storage=config.storage)
    except Exception:  # noqa: BLE001 -- the study may not exist yet if Ctrl-C came during loading
        study = None
    _say_interrupted(study, [worker_label()])
    if study is not None:
        _print_summary(study, config, "interrupted")
    raise typer.Exit(130)


def _work_left(study: Any, config: SearchConfig) -> bool:
    from autopeft.study import completed, trial_fits_budget

    return completed(study) < config.trials and trial_fits_budget(study, config)


def _say_interrupted(study: Any, workers: list[str]) -> None:
    """Which trials of these worker processes the Ctrl-C stopped (recorded as failed, 'interrupted')."""
    stopped = [t.number for t in study.trials if t.user_attrs.get("worker") in workers
               and t.user_attrs.get("fail_reason") == "interrupted"] if study is not None else []
    trials = ", ".join(map(str, stopped))
    err.print(f"interrupted: trial{'s' * (len(stopped) > 1)} {trials} recorded as failed with reason 'interrupted'"
              if stopped else "interrupted: no trial was running")


def _run_local_workers(count: int, config: SearchConfig) -> tuple[Any, list[str]]:
    """`--workers N` on one machine: the study exists now, with this search's settings recorded; N `autopeft
    worker` processes share it. Returns the summary (with why the workers stopped short, if they did) and a line
    for each worker that crashed. Ctrl-C reaches this process only (the workers have a session of their own),
    which passes it on once and prints the one summary."""
    import optuna

    from autopeft.search import SearchSummary
    from autopeft.stopping import SearchStops
    from autopeft.study import worker_label

    command = [sys.executable, "-m", "autopeft.cli", "worker", "--study", config.study, "--storage", config.storage,
               "--tracking-uri", config.tracking_uri, "--artifacts-dir", config.artifacts_dir, "--spawned"]
    if config.timeout is not None:
        command += ["--timeout", str(config.timeout)]
    study = optuna.load_study(study_name=config.study, storage=config.storage)
    stops = SearchStops(config, study)
    command += ["--run-began", stops.since.isoformat()]  # a worker that starts late counts the failures before it
    # Split the cores between workers: N processes each using every core would oversubscribe the CPU.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}
    processes = [subprocess.Popen([*command, "--worker-id", str(i)], env=env, start_new_session=True)
                 for i in range(count)]
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            process.send_signal(signal.SIGINT)
        for process in processes:
            process.wait()
        study = optuna.load_study(study_name=config.study, storage=config.storage)
        _say_interrupted(study, [worker_label(p.pid) for p in processes])
        _print_summary(study, config, "interrupted")
        raise typer.Exit(130) from None
    study = optuna.load_study(study_name=config.study, storage=config.storage)
    crashed = [f"worker {i} exited with code {code} (its output is above)" for i, code in enumerate(codes) if code]
    return SearchSummary(study, config, study.user_attrs.get("mlflow_parent_run_id", ""), stops.reason(study),
                         _fallback_written_since(stops.since)), crashed


def _fallback_written_since(began: datetime.datetime) -> str | None:
    """The fallback store, when a worker logged to it during this search. The workers run in this folder and only a
    process whose tracking store stopped answering writes there. Each worker said so, but the summary printed
    after them did not."""
    from autopeft.tracking import FALLBACK_URI

    path = Path(sqlite_file(FALLBACK_URI) or "")
    return FALLBACK_URI if path.is_file() and path.stat().st_mtime >= began.timestamp() else None


def _print_summary(study: Any, config: SearchConfig, stopped_reason: str | None, fallback_uri: str | None = None) -> None:
    from autopeft.export import DEFAULT_TOLERANCE, candidates, describe_rule, lead_of, majority_warning
    from autopeft.study import default_rule, forgetting_weight

    if not config.tracking_uri:  # a worker not told the store logs to the study's
        config = dataclasses.replace(config, tracking_uri=study.user_attrs.get("config", {}).get("tracking_uri", ""))
    console.print(trials_table(study))
    if stopped_reason:
        console.print(f"[yellow]{stopped_reason}[/yellow]")
    _print_split(study.user_attrs.get("split", {}), study.user_attrs.get("config", {}))
    _print_whole_split_batches(study)
    _print_measured_over_budget(study)
    chosen = False
    try:
        rule = default_rule(study)
        ranked = candidates(study, rule)
        accuracy, forgetting = _scores(ranked.trials[0])
        console.print(f"chosen ({rule} rule): trial {ranked.trials[0].number}, val accuracy {accuracy:.4f}, "
                      f"forgetting {forgetting:.4f} -- "
                      f"{describe_rule(rule, DEFAULT_TOLERANCE, forgetting_weight(study))}")
        warning = majority_warning(study, ranked.trials[0])
        if warning:
            console.print(f"[yellow]warning: {warning}[/yellow]")
        _print_lead(lead_of(study, ranked))
        chosen = True
    except AutopeftError as exc:
        if config.trials == 0 and not study.trials:  # created for workers, as asked
            console.print(f"study created with no trials; start workers: autopeft worker --study {config.study} "
                          f"--storage {redact_url(config.storage)} --tracking-uri {redact_url(config.tracking_uri)} "
                          "--trials N (the completed trials to reach)")
        else:
            console.print(f"no trial to choose: {exc}")
    console.print(f"Optuna study: {config.study} at {_where(config.storage)}")
    console.print(f"MLflow store: {_where(config.tracking_uri)} (experiment 'autopeft', run '{config.study}')")
    if fallback_uri:
        console.print(f"[yellow]  it stopped answering; runs from then on are in {fallback_uri}: copy them over with "
                      f"autopeft sync --source {fallback_uri} --target {redact_url(config.tracking_uri)}[/yellow]")
    if config.tracking_uri.startswith(("http://", "https://")):
        console.print(f"dashboard:    {_server_page(config.tracking_uri)} (the tracking server's own)")
    else:
        console.print(f"dashboard:    autopeft ui --tracking-uri {redact_url(config.tracking_uri)}")
    if chosen:  # nothing to export otherwise
        console.print(f"export:       autopeft export --study {config.study} --storage {redact_url(config.storage)} "
                      "--out export/")


def _server_page(uri: str) -> str:
    """A tracking server's address as a browser takes it: without the credentials a URI may carry."""
    return re.sub(r"//[^/@]*@", "//", uri)


def _print_split(split: dict[str, Any], recorded: dict[str, Any]) -> None:
    """The rows each split holds, and a warning where the task had fewer than the study asked for (the
    study's own sizes: a worker's command line has none)."""
    names = ("train", "validation", "test")
    held = [split.get(f"{name}_size") for name in names]
    asked = [recorded.get(f"{name}_size") for name in ("train", "val", "test")]
    if None in held or None in asked:
        return
    console.print("data: " + ", ".join(f"{name} {rows} rows" for name, rows in zip(names, held)))
    words, labels = recorded.get("label_words"), split.get("labels")
    if words and labels and len(words) == len(labels):  # --label-words follow the labels' sorted order, not the file's
        console.print("label words: " + ", ".join(f"{label!r} -> {word!r}" for label, word in zip(labels, words)))
    short = [f"--{option}-size {want} (got {got})" for option, want, got in zip(("train", "val", "test"), asked, held)
             if got < want]
    if short:
        console.print(f"[yellow]the task has fewer rows than asked: {', '.join(short)}[/yellow]")
    seen = [f"{split[f'{name}_rows_in_train']} of {split[f'{name}_size']} {name}"
            for name in ("validation", "test", "ood") if split.get(f"{name}_rows_in_train")]
    if seen:
        console.print(f"[yellow]warning: {', '.join(seen)} rows have the text of a training row; "
                      "their accuracy is not held out (duplicates in the data)[/yellow]")


def _print_whole_split_batches(study: Any) -> None:
    """A micro-batch larger than the training split holds all of it: such trials trained on fewer distinct rows
    per step than their settings say, which the table's batch size does not show."""
    rows = study.user_attrs.get("split", {}).get("train_size")
    sizes = {int(size) for trial in study.trials if trial.user_attrs.get("steps_trained")  # rejected ones never ran
             if (size := trial.user_attrs.get("params", {}).get("micro_batch_size")) is not None}
    over = sorted(size for size in sizes if rows and size > rows)
    if over:
        console.print(f"[yellow]warning: micro-batch {', '.join(map(str, over))} exceeds the {rows} training rows, "
                      "so each such micro-batch held all of them (a smaller micro_batch_size or more "
                      "--train-size gives the batch the space states)[/yellow]")


def _print_measured_over_budget(study: Any) -> None:
    """A trial is admitted on its estimate, and its real peak measured as it trains: where that came out above
    the budget it was admitted under (the CPU's trace misses some kilobytes the allocator keeps; a GPU's
    allocator may round up more), the budget the user set was not kept, and the table alone does not say so."""
    over = []
    for trial in study.trials:
        measured = trial.user_attrs.get("memory_measured_bytes")
        estimate = trial.user_attrs.get("memory_estimate", {}).get("total")
        margin = trial.constraints.get("memory")  # estimate - budget, set when a budget admitted the trial
        if measured and estimate is not None and margin is not None and margin <= 0:
            budget = round(estimate - margin)  # a resumed study's budget may differ from the one this trial had
            if measured > budget:
                over.append(f"trial {trial.number} {format_bytes(measured)}, {format_bytes(measured - budget)} "
                            f"over its {format_bytes(budget)}")
    if over:
        console.print(f"[yellow]warning: measured above the --memory-budget they were admitted under (their "
                      f"estimates were within it): {'; '.join(over)}[/yellow]")


def _print_lead(lead: Any) -> None:
    if lead is not None:
        console.print(f"how far it leads: {lead.describe()}")


def _scores(trial: Any) -> tuple[float, float]:
    from autopeft.study import scores

    return scores(trial)


def _scored(trial: Any) -> bool:
    from autopeft.study import has_scores

    return has_scores(trial)


def _trial_line(trial: Any) -> str:
    values = "acc {:.4f} forgetting {:.4f}".format(*_scores(trial)) if _scored(trial) else \
        trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason") or ""
    warm = f" ({trial.user_attrs['warm_start']})" if "warm_start" in trial.user_attrs else ""
    return (f"trial {trial.number} {trial.state.name.lower()}: {describe_params(trial.user_attrs.get('params', {}))}"
            f"{warm} {values}")


def _progress(study: Any, trial: Any) -> None:
    console.print(_trial_line(trial))


class SearchProgress:
    """A live progress bar (completed trials of the target, best so far, ETA) above the trial lines.
    Counts the study's completed trials, so a resumed search starts where it stands. Best so far is the
    highest accuracy, or in a scalar study the highest objective (what it ranks trials by). The ETA is this
    run's mean time per completed trial, counted from its first trial's start (not from loading the model),
    times the trials left (rich's own estimate looks back 30 s only, and trials take longer, so it never showed)."""

    def __init__(self, target: int, *, scalar: bool = False, done: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.scalar = scalar
        label = "best objective" if scalar else "best acc"
        self.bar = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(),
                            TextColumn(label + " {task.fields[best]}"), TextColumn("ETA {task.fields[eta]}"),
                            console=console, transient=True)
        # a resumed study's completed trials from the start, not from its first new trial's end
        self.task = self.bar.add_task("search", total=max(target, 1), completed=min(done, target), best="-", eta="-")
        self.target = target
        self.first_start: datetime.datetime | None = None
        self.completed_here = 0

    def __enter__(self) -> Self:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def __call__(self, study: Any, trial: Any) -> None:
        self.bar.console.print(_trial_line(trial))
        self.first_start = self.first_start or trial.datetime_start
        self.completed_here += trial.state.name == "COMPLETE"
        done = [t for t in study.get_trials(deepcopy=False) if _scored(t)]
        best = max((self._value(t) for t in done), default=None)
        self.bar.update(self.task, completed=min(len(done), self.target),
                        best="-" if best is None else f"{best:.4f}", eta=self._eta(len(done)))

    def _value(self, trial: Any) -> float:
        return trial.values[0] if self.scalar else _scores(trial)[0]

    def _eta(self, done: int) -> str:
        if not self.completed_here or self.first_start is None:
            return "-"
        elapsed = (datetime.datetime.now() - self.first_start).total_seconds()  # Optuna's times are naive local
        seconds = elapsed / self.completed_here * max(self.target - done, 0)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))


def describe_params(flat: dict[str, Any]) -> str:
    """The hyperparameters a person scans first, compactly."""
    if not flat:
        return "-"
    method = flat.get("method", "?")
    own = ", ".join(f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                    for k, v in flat.items() if k.startswith(f"{method}."))
    lr = flat.get("learning_rate")
    train = f"lr={lr:.2g} {flat.get('optimizer')} {flat.get('precision')} " \
            f"bs={flat.get('micro_batch_size')}x{flat.get('grad_accum_steps')}" if lr else ""
    return f"{method}({own}) {train}".strip()


def _reason(trial: Any, retried: dict[int, Any]) -> str:
    """Why a trial failed or was pruned. A failure the trial's code did not record is a worker that stopped
    sending heartbeats (its configuration then runs again as a later trial), or an error outside the trial."""
    recorded = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason")
    if recorded or trial.state.name != "FAIL":
        return recorded or ""
    if trial.number in retried:
        retry = retried[trial.number]
        runs = {"WAITING": "waits to run again as trial {}", "RUNNING": "runs again as trial {}",
                "PRUNED": "was queued again as trial {}, which was pruned"}.get(retry.state.name, "ran again as trial {}")
        return f"worker stopped (no heartbeat); its configuration {runs.format(retry.number)}"
    return "failed outside the trial's code, no reason recorded (see the search's log)"


def trials_table(study: Any) -> Table:
    """Every trial; a scalar study's also with the objective it ranks them by (a completed trial's value), and a
    study with memory as its third objective with each trial's peak memory (the value it was ranked by)."""
    from autopeft.study import is_scalar

    scalar = is_scalar(study)
    memory = "memory" in study.user_attrs.get("config", {}).get("objectives", [])
    table = Table(title=f"study {study.study_name}")
    numbers = ("#", "val acc", "forgetting", "objective", "memory", "wall s")
    for column in ("#", "method and hyperparameters", "val acc", "forgetting", *(("objective",) if scalar else ()),
                   *(("memory",) if memory else ()), "trainable", "wall s", "state"):
        table.add_column(column, justify="right" if column in numbers else "left")
    retried = {t.user_attrs["retry_of"]: t for t in study.trials if "retry_of" in t.user_attrs}
    for trial in study.trials:
        attrs = trial.user_attrs
        trainable = attrs.get("trainable_params")
        fraction = attrs.get("trainable_fraction")
        scored = _scores(trial) if _scored(trial) else None
        objective = (f"{trial.values[0]:.4f}" if scored else "-",) if scalar else ()
        peak = (format_bytes(trial.values[2]) if scored else "-",) if memory else ()
        table.add_row(
            str(trial.number), describe_params(attrs.get("params", {})) + (" (warm start)" if "warm_start" in attrs else ""),
            *((f"{v:.4f}" for v in scored) if scored else ("-", "-")), *objective, *peak,
            f"{trainable:,} ({100 * fraction:.2f}%)" if trainable else "-",
            f"{attrs['wall_seconds']:.1f}" if "wall_seconds" in attrs else "-",
            trial.state.name.lower() + (f": {_reason(trial, retried)}" if trial.state.name in ("FAIL", "PRUNED") else ""))
    return table


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="New or empty folder for adapter_config.json, training.yaml, metrics.json, README.md.")],
    study: Annotated[str, typer.Option(help="Study name (the one `autopeft search` ran).")] = "default",
    storage: Annotated[str, typer.Option(help="Optuna storage URL of the study.")] = "sqlite:///autopeft.db",
    trial: Annotated[int | None, typer.Option(help="Export this trial number instead of applying --select.")] = None,
    select: Annotated[str | None, typer.Option(help="Rule: balanced (best accuracy within --tolerance of the least forgetting on the Pareto front; a Pareto study's default), best-scalar (highest accuracy - forgetting weight x forgetting; a scalar study's default), best-accuracy, least-forgetting, or max-accuracy-under-forgetting=X.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Forgetting tolerance of the balanced rule (default 0.05), on the forgetting probe's scale (linear_probe: fraction of probe accuracy lost).")] = None,
    with_weights: Annotated[bool, typer.Option(help="Also write the trained adapter weights (safetensors); retrained if the trial's were not kept.")] = False,
    force: Annotated[bool, typer.Option(help="Write into --out even if it is not empty.")] = False,
    confirm_seeds: Annotated[int, typer.Option(help="Train each of the rule's leading candidates this many more times with new seeds and export the one that leads on the means (a search's best run is usually a lucky one). Each costs one trial's training; 0 exports the rule's pick as is.")] = 0,
    confirm_top: Annotated[int | None, typer.Option(help="How many of the rule's leading candidates --confirm-seeds retrains (default 3).", show_default=False)] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store --confirm-seeds logs its runs to (default: the store the search logged to, as the study recorded it).", show_default=False)] = None,
) -> None:
    """Write the chosen trial as files; its held-out test accuracy is computed here, once."""
    from autopeft.export import export_trial
    from autopeft.search import failure

    try:
        result = _guard(lambda: export_trial(study, storage, out, trial_number=trial, rule=select, tolerance=tolerance,
                                             with_weights=with_weights, force=force, confirm_seeds=confirm_seeds,
                                             confirm_top=confirm_top, tracking_uri=tracking_uri))
    except KeyboardInterrupt:
        err.print(f"interrupted: the export to {out} did not finish; an earlier export's files there are replaced "
                  "only once the new ones are ready")
        raise typer.Exit(130) from None
    except typer.Exit:  # bad input, already said in one line (exit 2)
        raise
    except Exception as exc:  # noqa: BLE001 -- retraining the trial here failed (no bitsandbytes, out of memory)
        if _state["debug"]:
            traceback.print_exc()
        _fail(f"export failed: {failure(exc)}", code=1)
    if result.confirmations:
        console.print(confirmation_table(result.confirmations, result.trial.number))
    if result.retrained:
        console.print(f"trial {result.trial.number}'s adapter was not kept here; retrained it with its seed")
    accuracy, forgetting = _scores(result.trial)
    console.print(f"trial {result.trial.number}: val accuracy {accuracy:.4f}, "
                  f"forgetting {forgetting:.4f}, test accuracy {result.test_accuracy:.4f}")
    _print_lead(result.lead)
    if result.warning:
        console.print(f"[yellow]warning: {result.warning}[/yellow]")
    console.print(f"wrote {', '.join(result.files)} to {out}")


def confirmation_table(confirmations: list[Any], chosen: int) -> Table:
    table = Table(title="confirmation: the leading candidates retrained with new seeds")
    for column in ("trial", "its run", "mean accuracy", "sd", "mean forgetting", "runs", ""):
        table.add_column(column)
    for c in confirmations:
        note = "exported" if c.trial_number == chosen else ("; ".join(c.failures) if c.failures else "")
        table.add_row(str(c.trial_number), f"{c.runs[0][1]:.4f}", f"{c.accuracy:.4f}", f"{c.accuracy_sd:.4f}",
                      f"{c.forgetting:.4f}", str(len(c.runs)), note)
    return table


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="training.yaml written by `autopeft export`.")],
    out: Annotated[Path, typer.Option(help="New or empty folder for the trained adapter.")] = Path("trained"),
    max_steps: Annotated[int | None, typer.Option(help="Override the number of optimizer steps (e.g. full length).")] = None,
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI to log the run to.")] = "sqlite:///mlflow.db",
    force: Annotated[bool, typer.Option(help="Write into --out even if it is not empty.")] = False,
    seed: Annotated[int | None, typer.Option(help="Training seed (adapter's initial weights, dropout, batch order) instead of the trial's; the data split stays the study's. How much the accuracy moves with it is how much to trust one run.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a hub model to run its own Python code (off by default; a recipe never turns it on).")] = False,
) -> None:
    """Train one exported configuration (same seeds), log it to MLflow and save the adapter."""
    from autopeft.search import failure
    from autopeft.training_run import train_from_recipe

    try:
        result = _guard(lambda: train_from_recipe(config, out, max_steps=max_steps, tracking_uri=tracking_uri,
                                                  force=force, seed=seed, trust_remote_code=trust_remote_code))
    except typer.Exit:  # bad input, already said in one line (exit 2)
        raise
    except Exception as exc:  # noqa: BLE001 -- trained (or began to) and failed: exit 1; --debug shows where
        if _state["debug"]:
            traceback.print_exc()
        _fail(f"training failed: {failure(exc)}", code=1)
    if result.warning:
        console.print(f"[yellow]warning: {result.warning}[/yellow]")
    console.print(f"{result.method}: val accuracy {result.accuracy:.4f}, forgetting {result.forgetting:.4f}, "
                  f"{result.steps} steps in {result.seconds:.1f} s; adapter saved to {out}; MLflow run {result.run_id}")


@app.command()
def estimate(
    config: Annotated[Path | None, typer.Option("--config", help="training.yaml (from `autopeft export`): estimate that configuration.")] = None,
    model: Annotated[str | None, typer.Option(help=f"With --space: hub id, local folder or packaged:<name> (only its config is read; default {DEFAULT_MODEL}).", show_default=False)] = None,
    space: Annotated[Path | None, typer.Option(help="With no --config: each method of this space, with the values the space fixes and the searched ones at their defaults (default: the shipped space).", show_default=False)] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per row of the longest batch (default: a --config recipe's max_length, at most the model's positions; else 128).")] = None,
    device: Annotated[str, typer.Option(help="Device to estimate for: cpu or cuda (works on a CPU-only machine).")] = "cpu",
    task_type: Annotated[str | None, typer.Option(help="With --space: classification (a head, the default) or causal_lm (logits over the vocabulary); a --config recipe says its own.")] = None,
) -> None:
    """Predict the peak training memory of a configuration, or of each method of a space, without training.

    The step is traced on fake tensors, so it works for models far too large for this machine."""
    from autopeft.recipe import read_recipe, worded_by
    from autopeft.space import TrialParams, load_space

    if device not in ("cpu", "cuda"):
        _fail(f"--device: {device!r} must be cpu or cuda")
    if seq_len is not None and seq_len < 2:
        _fail(f"--seq-len: {seq_len} must be at least 2")
    if task_type not in (None, "classification", "causal_lm"):
        _fail(f"--task-type: {task_type!r} must be classification or causal_lm")
    given = {"--model": model, "--space": space, "--task-type": task_type}
    for option in (name for name, value in given.items() if config is not None and value is not None):
        _fail(f"{option}: a --config recipe names its own model, method and task type; leave {option} out")

    def configurations() -> list[tuple[str, TrialParams, str, int, int | None]]:
        """(base model, configuration, task type, tokens per row, the recipe's steps) for each estimate."""
        if config is not None:
            recipe, params, _ = read_recipe(config)
            with worded_by(config):  # 'training.yaml: model: ...', as `autopeft train` says: no --model was given
                tokens = seq_len or _longest_row(recipe, params)
            return [(recipe.model, params, recipe.task_type, tokens, recipe.max_steps)]
        loaded = load_space(space or DEFAULT_SPACE)
        return [(model or DEFAULT_MODEL, loaded.fixed_params(name), task_type or "classification", seq_len or 128,
                 None) for name in loaded.method_names()]

    source = config or space or DEFAULT_SPACE
    unbuildable = []  # a space's methods are each estimated; those that cannot be are named after the others
    for base, params, kind, tokens, steps in _guard(configurations):
        _guard(functools.partial(_check_decoder, base, kind))
        own = ", ".join(f"{k}={v}" for k, v in params.method_params.items())
        _guard(functools.partial(_check_positions, base, tokens))  # the row alone: one line, whatever the method
        unsupported = _method_problem(base, params.method)
        if unsupported:  # as the search leaves it out (prefix tuning on flex attention, say)
            unbuildable.append(f"{source}: {unsupported}")
            continue
        try:
            _check_positions(base, tokens, _virtual_tokens(params))
            settings, result = _guard(functools.partial(_estimate_one, base, params, kind, tokens, steps, device))
        except ConfigError as exc:  # prompt tuning's virtual tokens past the positions: the other methods may fit
            unbuildable.append(f"{source}: {params.method}({own}): {first_line(exc)}")
            continue
        except TrialFailed as exc:  # e.g. a space's fixed value against another's default (AdaLoRA's ranks)
            at = "" if config is not None else " (the space's searched values at their defaults)"
            unbuildable.append(f"{source}: {params.method}({own}){at} cannot be built: {exc}")
            continue
        console.print(f"[bold]{params.method}[/bold]({own}) on {base} ({kind}): micro-batch {settings.micro_batch_size} x "
                      f"{tokens} tokens, {settings.optimizer}, {settings.precision}"
                      f"{', checkpointing' if settings.gradient_checkpointing else ''}")
        console.print(result.table(), highlight=False)
    if unbuildable:
        _fail(*unbuildable)


def _estimate_one(base: str, params: Any, kind: str, tokens: int, steps: int | None, device: str) -> tuple[Any, Any]:
    """The training settings of one configuration and its traced peak, as the search and export traced it."""
    from autopeft import memory
    from autopeft.train import TrainSettings

    known = TrainSettings.__dataclass_fields__
    settings = TrainSettings(**{k: v for k, v in params.training.items() if k in known})
    peft_task = "CAUSAL_LM" if kind == "causal_lm" else "SEQ_CLS"
    return settings, memory.estimate_traced(base, params.method, params.method_params, settings, seq_len=tokens,
                                            device=device, task_type=peft_task, max_steps=steps)


def _model_key(base: str) -> tuple[str, str]:
    """The caches below key on the model's folder and its files, not on --model as typed: in a process that goes
    on (the Python API, a notebook) a relative path names another folder from elsewhere, and a model may be saved
    again at its path."""
    from autopeft.models import model_fingerprint, resolve_model_path

    folder = resolve_model_path(base)
    return folder, model_fingerprint(folder)


def _local_config(base: str) -> Any:
    """The config of a local or packaged model (None when it cannot be read here). A hub id is left to the
    estimate, which reads its config once: offline, each read retries for seconds."""
    return _config_at(*_model_key(base))


@functools.cache
def _config_at(folder: str, fingerprint: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder) if Path(folder).is_dir() else None
    except (OSError, ValueError):  # not loadable: the estimate says so in its own words
        return None


def _meta_model(base: str) -> Any:
    """The model built from its config on the meta device (no weights, no memory), None when its config cannot
    be read here: what the checks below read its layout from."""
    return _meta_model_at(*_model_key(base))


@functools.cache  # once per model, not per configuration
def _meta_model_at(folder: str, fingerprint: str) -> Any:
    model_config = _config_at(folder, fingerprint)
    if model_config is None:
        return None
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(model_config)


def _method_problem(base: str, method: str) -> str | None:
    """Why `method` cannot apply to the model, as the search checks it; None also when its config cannot be read
    here (the estimate then says what it finds)."""
    from autopeft import methods

    model = _meta_model(base)
    return None if model is None else methods.get(method).problem(model)


def _longest_row(recipe: Any, params: Any) -> int:
    """The tokens a recipe's rows can have: its max_length, or fewer where the model's positions (less prompt
    tuning's virtual tokens) end first, as the search measures rows (a max_length of 500 trains on a 128-position
    model whose rows are short, and was refused here as a --seq-len nobody gave)."""
    limit = _position_limit(recipe.model)
    room = limit - _virtual_tokens(params) if limit is not None else recipe.max_length
    return min(recipe.max_length, room) if room >= 2 else recipe.max_length


def _check_decoder(base: str, kind: str) -> None:
    """Refused as the search refuses it (search.refuse_encoder)."""
    model = _meta_model(base) if kind == "causal_lm" else None
    if model is None:
        return
    from autopeft.search import refuse_encoder

    refuse_encoder(base, model)


def _position_limit(base: str) -> int | None:
    """The positions the model's table gives, as the search counts them (RoBERTa's 514 rows give 512); else its
    config's count (GPT-J's sinusoids are a buffer, not a table). None when unknown, or rotary: Llama's positions
    have no table to run off, whatever max_position_embeddings says."""
    model_config = _local_config(base)
    if model_config is None or any(key.startswith("rope") for key in model_config.to_dict()):
        return None
    from autopeft.models import position_table_rows

    table = position_table_rows(_meta_model(base))
    return table or getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)


def _check_positions(base: str, tokens: int, virtual: int = 0) -> None:
    """A row (with prompt tuning's virtual tokens) longer than the model's position table cannot be traced (nor
    trained): say so in one line."""
    limit = _position_limit(base)
    if limit is not None and tokens + virtual > limit:
        extra = f" + {virtual} virtual tokens of prompt tuning" if virtual else ""
        fix = (f"estimate at {limit - virtual} tokens or fewer" if limit - virtual >= 2
               else f"prompt tuning leaves no room for a row: use fewer than {limit - 1} virtual tokens")
        raise ConfigError([f"--seq-len: {tokens} tokens{extra} exceed {base}'s {limit} positions; {fix}"])


def _virtual_tokens(params: Any) -> int:
    """The positions a method adds in front of each row (prompt tuning's virtual tokens), else 0."""
    from autopeft import methods

    added = methods.get(params.method).added_positions
    return added(params.method_params) if added else 0


@app.command()
def report(
    study: Annotated[str, typer.Option(help="Study name (the one `autopeft search` ran).")] = "default",
    out: Annotated[Path, typer.Option(help="Folder for report.html and the PNG plots.")] = Path("report"),
    storage: Annotated[str, typer.Option(help="Optuna storage URL of the study.")] = "sqlite:///autopeft.db",
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store holding the study's parent run (the report is logged to it); default: the store the search logged to, as the study recorded it.")] = None,
    select: Annotated[str | None, typer.Option(help="The rule whose pick the report marks, as for `autopeft export` (default: the study's, balanced or best-scalar).")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Forgetting tolerance of the balanced rule (default 0.05).")] = None,
) -> None:
    """Write a self-contained HTML report and PNG plots of a study, and log them to its MLflow parent run."""
    from autopeft.export import create_out, load_existing_study, require_search_study, rule_settings
    from autopeft.report import check_report_out, write_report

    found = _guard(lambda: load_existing_study(study, storage))
    _guard(lambda: require_search_study(found, needs_config=False))  # a plain Optuna study with two objectives is drawn
    rule, tolerance_used = _guard(lambda: rule_settings(found, select, tolerance))
    parent = found.user_attrs.get("mlflow_parent_run_id")
    logged_to = found.user_attrs.get("config", {}).get("tracking_uri")
    # The study records its store (a sqlite file by absolute path), so a report from another folder finds it; a
    # URL whose password was left out of the record must be given again.
    tracking_uri = tracking_uri or (logged_to if logged_to and "***@" not in logged_to else "sqlite:///mlflow.db")
    if parent:
        parent = _parent_run(tracking_uri, parent, logged_to)
    _guard(lambda: check_report_out(out))
    _guard(lambda: create_out(out))
    paths = write_report(found, out, rule=rule, tolerance=tolerance_used)
    if parent:
        from autopeft.tracking import Tracker

        tracker = Tracker(tracking_uri)
        for path in paths:
            tracker.log_file(parent, path, artifact_path="report")
    console.print(f"wrote {', '.join(p.name for p in paths)} to {out}" + (f"; logged to MLflow run {parent}" if parent else ""))


def _fail_unless_mlflow_store(uri: str, option: str, hint: str = "") -> None:
    """Refuse, before MLflow connects, a store a reading command cannot read (config.existing_mlflow_store_problem)."""
    problem = existing_mlflow_store_problem(uri, option, hint)
    if problem:
        _fail(problem)


def _parent_run(tracking_uri: str, parent: str, logged_to: str | None) -> str:
    """The study's parent run in this store: its own id, or its synced copy's (a parent run logged to the
    fallback store while the server was down). The report is logged to it: a store without it is refused
    before anything is written (and a missing sqlite file is not created, as SQLAlchemy would on connect)."""
    elsewhere = logged_to and _where(logged_to).rstrip("/") != _where(tracking_uri).rstrip("/")
    hint = f" (the search logged to {logged_to}; pass it as --tracking-uri)" if elsewhere else ""
    _fail_unless_mlflow_store(tracking_uri, "--tracking-uri", hint)
    from mlflow.exceptions import MlflowException

    from autopeft.tracking import EXPERIMENT, FALLBACK_URI, client_for, fail_fast, synced_copy

    fail_fast(tracking_uri)
    try:
        client = client_for(tracking_uri)
        with contextlib.suppress(MlflowException):
            return client.get_run(parent).info.run_id
        experiment = client.get_experiment_by_name(EXPERIMENT)
        copy = synced_copy(client, experiment.experiment_id, parent) if experiment else None
    except Exception as exc:  # noqa: BLE001 -- a server that does not answer, however MLflow says it
        _fail(f"--tracking-uri: cannot read {redact_url(tracking_uri)}: {first_line(exc, 200)}")
    if copy:
        return copy
    if elsewhere:
        _fail(f"--tracking-uri: {redact_url(tracking_uri)} holds no run {parent}, this study's parent run{hint}")
    # Where the search logged to, but not there: it fell back to its local store, not copied over yet.
    _fail(f"--tracking-uri: {redact_url(tracking_uri)} holds neither run {parent}, this study's parent run, nor a "
          f"copy of it; if the search logged to {FALLBACK_URI} while the server was down, copy it first: "
          f"autopeft sync --source {FALLBACK_URI} --target {redact_url(tracking_uri)}")


@app.command()
def ui(
    tracking_uri: Annotated[str, typer.Option(help="MLflow store the search wrote to.")] = "sqlite:///mlflow.db",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
) -> None:
    """Serve the MLflow dashboard (127.0.0.1 unless --host says otherwise). Ctrl-C stops it."""
    if not 1 <= port <= 65535:
        _fail(f"--port: {port} must be between 1 and 65535")
    _fail_unless_mlflow_store(tracking_uri, "--tracking-uri", "; run `autopeft search` first")
    if tracking_uri.startswith(("http://", "https://")):  # `mlflow ui` serves a database, not another server
        _fail(f"--tracking-uri: {redact_url(tracking_uri)} is a tracking server, which serves its own dashboard: "
              f"open {_server_page(tracking_uri)} in a browser")
    busy = _port_in_use(host, port)
    if busy:  # mlflow would log the error and exit 0, after the line below named a URL another program serves
        _fail(f"--port: {host}:{port} cannot be served: {busy}; choose a free one with --port")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port)]
    console.print(f"MLflow UI on http://{host}:{port} (Ctrl-C stops it)")
    raise typer.Exit(_serve(command))


def _port_in_use(host: str, port: int) -> str | None:
    """Why the dashboard could not bind host:port (in use, or a host this machine does not have), or None."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv6 for --host ::1
        with socket.create_server((host, port), family=family):
            return None
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # Ctrl-C, kill, the terminal closing


def _serve(command: list[str]) -> int:
    """Run the dashboard until it exits or this process is stopped. It runs in a process group of its own (mlflow
    starts a web server and job runners under it), stopped as a whole however this process stops: Ctrl-C, a
    signal sent to this process alone, which once left the dashboard serving, or the terminal closing (the
    group, a session of its own, gets no hang-up from it)."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, stop) for sig in _STOPS}
    server = subprocess.Popen(command, start_new_session=True)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig in _STOPS:  # a second Ctrl-C must not cut the stop short and leave the group running
            signal.signal(sig, signal.SIG_IGN)
        _stop_group(server)
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _stop_group(server: subprocess.Popen[bytes]) -> None:
    """Ctrl-C to the whole group, then SIGKILL to what is left of it: mlflow's job runners, started while it
    shut down, outlived it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=20)
    time.sleep(1)  # a runner started as the server stopped is in the group by now
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


@app.command("sync")
def sync_stores(
    source: Annotated[str, typer.Option(help="Store to copy from (e.g. the fallback sqlite:///mlflow-fallback.db).")],
    target: Annotated[str, typer.Option(help="Store to copy into (e.g. the tracking server http://host:port).")],
) -> None:
    """Copy runs logged to a fallback store (while the tracking server was down) into the real one."""
    from autopeft.sync import SourceUnreadable, sync

    _fail_unless_mlflow_store(source, "--source")
    if _where(source).rstrip("/") == _where(target).rstrip("/"):  # each run would be copied beside itself
        _fail(f"--target: {redact_url(target)} is the store --source names; sync copies runs into another store")
    problem = tracking_uri_problem(target, "--target") or tracking_store_problem(target, "--target")
    if problem:
        _fail(problem)
    try:
        result = sync(source, target)
    except SourceUnreadable as exc:
        _fail(f"--source: cannot read {redact_url(source)}: {first_line(exc, 200)}")
    except Exception as exc:  # noqa: BLE001 -- an unreachable target, whatever the store raises: say so in one line
        _fail(f"--target: cannot sync into {redact_url(target)}: {first_line(exc, 200)}")
    held = f"{result.completed} of them completing runs it held; " if result.completed else ""
    console.print(f"copied {result.copied} runs to {redact_url(target)} ({held}{result.skipped} already synced)")


@app.command("methods")
def list_methods() -> None:
    """List the PEFT methods, their parameters (default; allowed values) and the architectures they support,
    then the training parameters every method shares: what a search-space YAML may name."""
    from autopeft import methods
    from autopeft.space import TRAINING_PARAMS

    def describe(specs: dict[str, methods.ParamSpec]) -> str:
        return "\n".join(f"{k} ({s.shown_default()}; {s.allowed()}): {s.help}" for k, s in specs.items())

    table = Table()
    for column in ("method", "what", "parameters (default; allowed)", "architectures", "merges"):
        table.add_column(column)
    for name in methods.names():
        method = methods.get(name)
        table.add_row(name, method.summary, describe(method.params), ", ".join(method.families),
                      "yes" if method.can_merge else "no")
    console.print(table)
    training = Table(title="training parameters (the space's `training:` section, or per method)")
    training.add_column("parameters (default; allowed)")
    training.add_row(describe(TRAINING_PARAMS))
    console.print(training)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
