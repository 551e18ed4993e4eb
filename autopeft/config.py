"""Frozen, validated configuration of a search. Every problem is collected and reported at once."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from autopeft.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_SPACE = PACKAGE_DIR / "search_spaces" / "default.yaml"
DEFAULT_MODEL = "packaged:all-MiniLM-L6-v2"
DEFAULT_TASK = "packaged:rotten_tomatoes"

SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
PRUNERS = ("none", "hyperband", "successive-halving", "median")
EXTRA_OBJECTIVES = ("memory", "trainable_params")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """'8GiB' -> bytes. Accepts B, KB/MB/GB/TB (powers of 10) and KiB/MiB/GiB/TiB (powers of 2)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"memory budget {text!r} is not a size; use a number and a unit, e.g. 8GiB or 512MB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value <= 0:
        raise ValueError(f"memory budget {text!r} must be greater than zero")
    return int(value)


def redact_url(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (a password is never written out)."""
    return re.sub(r"(//[^/:@]*:)[^/]*@", r"\1***@", url)


def sqlite_file(url: str) -> str | None:
    """The database file a sqlite URL names (None for another store or an in-memory one)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return database if database and database != ":memory:" else None


def _distinct_columns(named: dict[str, str]) -> list[str]:
    """A text column that is also the label column gives a model its own labels to read: it scores 1.0 and
    learns nothing. `named`: each option and the column it names."""
    if len(set(named.values())) == len(named):
        return []
    return [", ".join(f"{option} {column!r}" for option, column in named.items()) + ": each must name a different column"]


def absolute_sqlite_url(url: str) -> str:
    """A sqlite URL naming a relative file, made absolute: a worker or an export run from another folder must
    find the same store. Other URLs as given."""
    database = sqlite_file(url)
    if database is None or Path(database).is_absolute():
        return url
    prefix = url[:url.index("///") + 3]  # sqlite:/// (or sqlite+driver:///): the file's name follows
    return prefix + str(Path(database).resolve()) + url[len(prefix) + len(database):]


def missing_sqlite_file(url: str) -> str | None:
    """The file a sqlite:/// URL names, when it does not exist: a command that only reads a store refuses it,
    because SQLAlchemy would create an empty database there on connect."""
    database = sqlite_file(url)
    return database if database and not Path(database).exists() else None


# What MLflow 3 logs to ("" in the config: a worker's, which logs to its study's store). A bare path or file:
# is MLflow's file store, which it no longer opens; any other scheme it has no store for. Both once ran the
# whole search against the fallback store, as if a server had stopped answering.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")


MLFLOW_TABLES = frozenset({"experiments", "runs"})
OPTUNA_TABLES = frozenset({"studies", "version_info"})


def _sqlite_tables(database: str) -> set[str] | None:
    """The tables of an existing sqlite file, opened read-only so that looking writes nothing; None when it
    cannot be read now (locked: not this check's to judge, the store says what it is)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True,
                                                timeout=1)) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError:
        return None
    except sqlite3.DatabaseError:  # "file is not a database"
        return {"(not a database)"}


def sqlite_without_mlflow(url: str) -> str | None:
    """The file a sqlite:/// URL names, when it exists but holds no MLflow store (the study's Optuna database,
    another program's, not a database at all, or an empty file): a command that only reads a store refuses it,
    because MLflow would write its tables into the file on connect."""
    return sqlite_of_another_kind(url, MLFLOW_TABLES, empty_too=True)


def sqlite_of_another_kind(url: str, own: frozenset[str], *, empty_too: bool = False) -> str | None:
    """The file a sqlite:/// URL names, when it holds tables but not the `own` ones of the store a command would
    write (MLflow's, Optuna's) or is not a database: connecting would write that store's tables into another
    program's file. A missing file, or an empty one unless `empty_too`, is the command's to create."""
    database = sqlite_file(url)
    if not database or not Path(database).is_file():
        return None
    tables = _sqlite_tables(database)
    if tables is None or own <= tables:
        return None
    return database if tables or empty_too else None


def same_sqlite_file(url: str, other: str) -> bool:
    ours, theirs = sqlite_file(url), sqlite_file(other)
    return bool(ours and theirs) and Path(ours).resolve() == Path(theirs).resolve()  # type: ignore[arg-type]


def tracking_store_problem(uri: str, option: str = "--tracking-uri", storage: str | None = None) -> str | None:
    """Why a command that logs runs may not write to `uri`: MLflow would add its tables to another store (the
    study's own `storage`, which a new search has not created yet)."""
    if storage and same_sqlite_file(uri, storage):
        return (f"--storage, {option}: both name {sqlite_file(uri)}; the Optuna study and MLflow's runs each need "
                "a store of their own (by default sqlite:///autopeft.db and sqlite:///mlflow.db)")
    foreign = sqlite_of_another_kind(uri, MLFLOW_TABLES)
    if foreign:
        return f"{option}: {foreign} is not an MLflow store (it holds another program's tables)"
    blocked = _file_in_the_way(uri)  # MLflow cannot create it: every run would go to the fallback store
    return f"{option}: {sqlite_file(uri)} cannot be created: {blocked} is a file, not a folder" if blocked else None


def _file_in_the_way(url: str) -> Path | None:
    """A file where a sqlite URL's path needs a folder (sqlite:///data.csv/runs.db)."""
    database = sqlite_file(url)
    if database is None:
        return None
    return next((folder for folder in Path(database).expanduser().absolute().parents if folder.is_file()), None)


def existing_mlflow_store_problem(uri: str, option: str = "--tracking-uri", hint: str = "") -> str | None:
    """Why a command that reads (or adds to) an existing MLflow store cannot use `uri`, before MLflow connects:
    MLflow creates a missing sqlite file, writes its tables into another program's database (the study's own
    autopeft.db, say), and raises a traceback for a scheme it has no store for. `hint` ends the file problems."""
    problem = tracking_uri_problem(uri, option)
    if problem:
        return problem
    if missing_sqlite_file(uri):
        return f"{option}: no MLflow store at {uri}{hint}"
    foreign = sqlite_without_mlflow(uri)
    return f"{option}: {foreign} is not an MLflow store (it holds no MLflow tables){hint}" if foreign else None


def tracking_uri_problem(uri: str, option: str = "--tracking-uri") -> str | None:
    if uri.split(":", 1)[0].split("+", 1)[0].lower() in TRACKING_SCHEMES:
        return None
    return (f"{option}: {redact_url(uri)!r} is not a store MLflow logs to; use sqlite:///mlflow.db (a local file), "
            "http(s)://host:port (a tracking server) or a database URL (postgresql://...)")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """What a search runs on and how long. Each field is one CLI option of `autopeft search`."""

    model: str = DEFAULT_MODEL  # hub id, local folder, or packaged:<name>
    task: str = DEFAULT_TASK  # packaged:rotten_tomatoes (more task sources arrive with the tasks issue)
    space: str = str(DEFAULT_SPACE)  # search-space YAML file
    study: str = "default"  # Optuna study name; re-using it resumes the study
    storage: str = "sqlite:///autopeft.db"  # any Optuna storage URL
    tracking_uri: str = "sqlite:///mlflow.db"  # any MLflow tracking URI
    artifacts_dir: str = "autopeft-artifacts"  # trained adapters, one folder per study and trial
    trials: int = 6  # trials to complete in this study (counting those already finished on resume)
    timeout: float | None = None  # seconds of wall time for this invocation
    memory_budget: int | None = None  # bytes; trials estimated above it are pruned before training
    device: str | None = None  # the budget's device (cuda or cpu; default: where the search trains)
    seed: int = 0  # seeds the sampler, the data split and every trial's training
    max_steps: int = 150  # optimizer steps per trial
    train_size: int = 4000  # rows sampled (stratified) for training; the rest of the split follows
    val_size: int = 1000
    test_size: int = 1000
    max_length: int = 128  # tokens per text after truncation
    eval_batch_size: int = 128
    max_consecutive_failures: int = 5  # stop the search instead of burning the budget on a broken setup
    heartbeat_seconds: int = 10  # a trial silent for 3x this long is failed as stale and retried
    force_new: bool = False  # replace an existing study of this name instead of refusing a mismatch
    trust_remote_code: bool = False  # run model code shipped with a hub model (off: it executes arbitrary code)
    worker_id: int | None = None  # distinguishes the samplers of workers sharing one study
    objectives: tuple[str, ...] = ("accuracy", "forgetting")  # Pareto objectives; a third may be added
    objective_mode: str = "pareto"  # pareto, or scalar: accuracy - forgetting_weight * forgetting
    forgetting_weight: float = 1.0  # scalar mode only
    sampler: str = "tpe"  # tpe | nsga2 | gp | random | grid
    pruner: str = "none"  # scalar mode only: hyperband | successive-halving | median | none
    prune_after: int | None = None  # steps before a pruner may stop a trial (default: half of max_steps)
    max_total_steps: int | None = None  # training-step budget over all trials (pruned trials count)
    warm_start: bool = False  # enqueue the documented default LoRA recipe as the first trial
    text_column: str = "text"  # columns of the user's data
    label_column: str = "label"
    text_pair_column: str | None = None  # sentence pairs: the second text
    task_type: str = "classification"  # classification (a head) or causal_lm (answer label words; decoders)
    label_words: tuple[str, ...] | None = None  # causal_lm: the word for each label (default: label names)
    template: str | None = None  # causal_lm: prompt with {text} (and {text_pair})
    causal_eval: str = "rank"  # causal_lm accuracy: rank the label words, or generate and match exactly
    ood_task: str | None = None  # an out-of-distribution evaluation set with the same labels
    ood_text_column: str | None = None  # its columns, where they are named otherwise (default: the task's)
    ood_label_column: str | None = None
    ood_text_pair_column: str | None = None
    probes: tuple[str, ...] | None = None  # probe names (default: by model kind; see autopeft.probes)

    def __post_init__(self) -> None:
        problems = []
        if self.trials < 0:
            problems.append(f"--trials: {self.trials} must be at least 0 (0 only creates the study, for workers)")
        for name in ("max_steps", "train_size", "val_size", "test_size", "max_length",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')}: {getattr(self, name)} must be at least 1")
        if not 0 <= self.seed < 2**32:  # numpy's and torch's generators take no negative seed
            problems.append(f"--seed: {self.seed} must be between 0 and 2**32 - 1")
        if self.timeout is not None and not 0 < self.timeout < math.inf:  # nan fails every comparison: no timeout
            problems.append(f"--timeout: {self.timeout} must be a positive, finite number of seconds")
        if self.worker_id is not None and self.worker_id < 0:
            problems.append(f"--worker-id: {self.worker_id} must be 0 or more")
        if self.memory_budget is not None and self.memory_budget <= 0:
            problems.append(f"--memory-budget: {self.memory_budget} must be greater than zero")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.study):
            problems.append(f"--study: {self.study!r} may only hold letters, digits, '.', '_' and '-'")
        if self.max_consecutive_failures < 1:
            problems.append(f"--max-consecutive-failures: {self.max_consecutive_failures} must be at least 1")
        if not 1 <= self.heartbeat_seconds <= 10**8:  # about 3 years; far beyond it the heartbeat thread's timer overflows
            problems.append(f"--heartbeat: {self.heartbeat_seconds} must be between 1 and 100000000 (seconds)")
        problems += _distinct_columns({"--text-column": self.text_column, "--label-column": self.label_column,
                                       **({"--text-pair-column": self.text_pair_column} if self.text_pair_column else {})})
        problems += self._strategy_problems() + self._ood_column_problems()
        if Path(self.space).is_dir():
            problems.append(f"--space: {self.space} is a folder; give a search-space YAML file")
        elif not Path(self.space).is_file():
            problems.append(f"--space: {self.space} does not exist")
        if problems:
            raise ConfigError(problems)

    def _strategy_problems(self) -> list[str]:
        problems = []
        objectives = tuple(self.objectives)
        if objectives[:2] != ("accuracy", "forgetting") or len(objectives) > 3 or \
                (len(objectives) == 3 and objectives[2] not in EXTRA_OBJECTIVES):
            problems.append(f"--objectives: {','.join(objectives)} is not allowed; use accuracy,forgetting "
                            f"optionally followed by one of {', '.join(EXTRA_OBJECTIVES)}")
        if self.objective_mode not in ("pareto", "scalar"):
            problems.append(f"--objective-mode: {self.objective_mode!r} must be pareto or scalar")
        if self.sampler not in SAMPLERS:
            problems.append(f"--sampler: {self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            problems.append(f"--pruner: {self.pruner!r} must be one of {', '.join(PRUNERS)}")
        elif self.pruner != "none" and self.objective_mode != "scalar":
            problems.append(f"--pruner: {self.pruner} needs --objective-mode scalar (Optuna cannot prune "
                            "multi-objective studies)")
        if self.objective_mode == "scalar" and len(objectives) == 3:
            problems.append(f"--objectives: a third objective ({objectives[2]}) needs --objective-mode pareto; scalar "
                            "mode maximizes accuracy - --forgetting-weight x forgetting")
        if self.warm_start and self.sampler == "grid":
            problems.append("--warm-start: not with --sampler grid, which decides every trial; put the recipe's "
                            "values in the grid instead")
        if self.prune_after is not None and self.pruner == "none":
            problems.append("--prune-after: needs a --pruner (without one no trial is stopped early)")
        elif self.prune_after is not None and not 1 <= self.prune_after < self.max_steps:
            problems.append(f"--prune-after: {self.prune_after} must be at least 1 and below --max-steps "
                            f"({self.max_steps})")
        elif self.pruner in PRUNERS and self.pruner != "none" and self.max_steps == 1:
            problems.append(f"--pruner: {self.pruner} needs --max-steps 2 or more (a one-step trial has no step "
                            "before its end to stop it at)")
        if self.max_total_steps is not None and self.max_total_steps < 1:
            problems.append(f"--max-total-steps: {self.max_total_steps} must be at least 1")
        if self.device not in (None, "cpu", "cuda"):
            problems.append(f"--device: {self.device!r} must be cpu or cuda")
        if self.task_type not in ("classification", "causal_lm"):
            problems.append(f"--task-type: {self.task_type!r} must be classification or causal_lm")
        if self.causal_eval not in ("rank", "generate"):
            problems.append(f"--causal-eval: {self.causal_eval!r} must be rank or generate")
        if self.task_type == "classification":  # a classification head has no words or prompt to use them
            given = {"--label-words": self.label_words, "--template": self.template,
                     "--causal-eval": None if self.causal_eval == "rank" else self.causal_eval}
            problems += [f"{name}: applies to --task-type causal_lm only (this task is classification)"
                         for name, value in given.items() if value is not None]
        if self.template is not None:
            from autopeft.errors import DataError
            from autopeft.verbalizer import check_template

            try:
                check_template(self.template)
            except DataError as exc:
                problems.append(str(exc))
        if not 0 <= self.forgetting_weight < math.inf:  # also refuses nan, which every comparison fails
            problems.append(f"--forgetting-weight: {self.forgetting_weight} must be a finite number, at least 0")
        if self.tracking_uri and (problem := tracking_uri_problem(self.tracking_uri)):
            problems.append(problem)
        if self.storage.startswith("sqlite:") and sqlite_file(self.storage) is None:
            problems.append(f"--storage: {self.storage} is an in-memory database, which keeps nothing once this "
                            "process ends (export, report and workers read the study from it); name a file, e.g. "
                            "sqlite:///autopeft.db")
        return problems

    def _ood_column_problems(self) -> list[str]:
        given = {"--ood-text-column": self.ood_text_column, "--ood-label-column": self.ood_label_column,
                 "--ood-text-pair-column": self.ood_text_pair_column}
        if self.ood_task is None:
            return [f"{name}: needs --ood-task (it names a column of that set)"
                    for name, value in given.items() if value is not None]
        if self.ood_text_pair_column is not None and self.text_pair_column is None:
            return [("--ood-text-pair-column: the task has no second text (--text-pair-column); a model trained on "
                     "single texts is scored on single texts")]
        if not any(given.values()):  # the task's own columns: checked as the task's
            return []
        own = {"text": self.ood_text_column, "label": self.ood_label_column, "text-pair": self.ood_text_pair_column}
        task = {"text": self.text_column, "label": self.label_column, "text-pair": self.text_pair_column}
        named = {(f"--ood-{k}-column" if own[k] else f"--{k}-column"): own[k] or task[k] for k in own if own[k] or task[k]}
        return _distinct_columns(named)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """What may be written to MLflow, the study and exported files: URLs without their passwords, and
        local model and data paths made absolute (an export or a worker may run from another folder)."""
        data = asdict(self)
        data["storage"], data["tracking_uri"] = redact_url(self.storage), absolute_sqlite_url(redact_url(self.tracking_uri))
        for key in LOCAL_PATH_KEYS:
            data[key] = absolute_if_local(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> SearchConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        merged = {**known, **overrides}
        for key in ("objectives", "label_words", "probes"):  # JSON (a study's record) gives lists
            if merged.get(key) is not None:
                merged[key] = tuple(merged[key])
        return cls(**merged)


LOCAL_PATH_KEYS = ("model", "task", "ood_task")  # a config's values that may name a local file or folder


def absolute_if_local(source: str | None) -> str | None:
    """A model or data path that exists here, made absolute; a hub id or packaged name as given."""
    if source is None:
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
