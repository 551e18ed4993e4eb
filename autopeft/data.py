"""Tasks: load labelled texts, split them (seeded, stratified), tokenize once, batch with little padding.

Where the rows come from (packaged task, local file or folder, hub dataset) is sources.py. Splits: a
source that carries its own train / validation / test keeps them (each capped at its requested size by a
seeded stratified sample, or where a class is too rare for that a random one keeping a row of each class, as
recorded); the splits it lacks are carved from its train rows by a seeded stratified
split. A single table is split entirely that way. How each split was made is in TaskData.describe(),
which the study records. Bad data stops with one line that names the file, the column and what is wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from autopeft.errors import DataError, RareClassError
from autopeft.sources import (
    PACKAGED_TASKS,
    Columns,
    Source,
    read_source,
    refuse_columns_for_packaged,
    row_numbers,
)

__all__ = ["PACKAGED_TASKS", "Columns", "TaskData", "TextSplit", "TokenizedSplit", "collate", "eval_batches",
           "eval_positions_limited", "length_grouped_batches", "load_eval_split", "load_task", "tokenize",
           "with_eval_answers"]
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int]
    pairs: list[str] | None = None  # the second text of each row, for sentence-pair tasks

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for i, (text, label) in enumerate(zip(self.texts, self.labels, strict=True)):
            pair = f"\t{self.pairs[i]}" if self.pairs is not None else ""  # single texts hash as before
            digest.update(f"{label}\t{text}{pair}\n".encode())
        return digest.hexdigest()[:16]


def _rows(split: TextSplit) -> Iterator[tuple[str, str | None]]:
    return zip(split.texts, split.pairs or [None] * len(split.texts))


@dataclass(frozen=True)
class TaskData:
    name: str
    label_names: list[str]
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    seed: int
    columns: Columns = field(default_factory=Columns)
    origins: dict[str, str] = field(default_factory=dict)  # split -> how it was made
    ood: TextSplit | None = None  # the out-of-distribution evaluation set (--ood-task), when given

    def describe(self) -> dict[str, Any]:
        """What the study records about the split, so a resumed or exported run can check it."""
        recorded = {**self.splits(), **({"ood": self.ood} if self.ood is not None else {})}
        seen = set(_rows(self.train))
        return {
            "task": self.name, "labels": self.label_names, "split_seed": self.seed,
            **{f"{name}_size": len(split.texts) for name, split in recorded.items()},
            **{f"{name}_fingerprint": split.fingerprint() for name, split in recorded.items()},
            **{f"{name}_origin": origin for name, origin in self.origins.items()},
            "text_column": self.columns.text, "label_column": self.columns.label,
            "text_pair_column": self.columns.text_pair,
            "validation_majority": self.majority_rate(self.validation),
            # Rows whose text (and pair) also occurs in train: duplicates in the user's data, which a held-out
            # score would count as unseen.
            **{f"{name}_rows_in_train": sum(row in seen for row in _rows(split))
               for name, split in recorded.items() if name != "train"},
        }

    @staticmethod
    def majority_rate(split: TextSplit) -> float:
        """Accuracy of always predicting the most common class: the score of a model that learned nothing."""
        return max(split.labels.count(c) for c in set(split.labels)) / len(split.labels)

    def splits(self) -> dict[str, TextSplit]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def load_task(task: str, *, seed: int, train_size: int, val_size: int, test_size: int,
              columns: Columns | None = None, open_answers: bool = False) -> TaskData:
    """Train / validation / test of at most the requested sizes: the source's own splits where it has them,
    a seeded stratified split of its train rows for the others.

    `open_answers`: the labels are answers a causal LM generates (question answering), not a closed set of
    classes: an answer need not occur in train, and where answers are too varied to stratify (a class per
    row, say) the split is a seeded random one."""
    columns = columns or Columns()
    refuse_columns_for_packaged(task, columns)
    source = read_source(task, columns)
    label_names = _checked_label_names(source, columns, open_answers)
    ids = {name: i for i, name in enumerate(label_names)}
    requested = {"train": train_size, "validation": val_size, "test": test_size}
    frames, origins = _arrange(source, ids, requested, seed, open_answers)
    if "validation" in source.frames and not open_answers:
        _refuse_one_class_validation(frames["validation"], columns, f"--task: {source.locations['validation']}")
    texts = {s: _text_split(f, ids, columns) for s, f in frames.items()}
    return TaskData(task, label_names, texts["train"], texts["validation"], texts["test"], seed, columns, origins)


def _checked_label_names(source: Source, columns: Columns, open_answers: bool) -> list[str]:
    """The training rows' classes (every split's answers, for open answers), after checking every row of
    every split (one clear line per problem)."""
    for split, frame in source.frames.items():
        check_rows(frame, columns, f"--task: {source.locations[split]}")
    if open_answers:
        for frame in source.frames.values():
            _strip_answers(frame)
        every = pd.concat(list(source.frames.values()), ignore_index=True)
        return _label_names(every, columns, f"--task: {source.name}")
    pool = "train" if "train" in source.frames else "all"
    label_names = _label_names(source.frames[pool], columns, f"--task: {source.locations[pool]}")
    _refuse_near_duplicates(label_names, columns, f"--task: {source.locations[pool]}")
    for split in ("validation", "test"):
        if split in source.frames:
            check_known_labels(source.frames[split], label_names, columns, f"--task: {source.locations[split]}",
                               f"train ({source.locations[pool]})")
    if "validation" in source.frames:  # every trial would score the same: it ranks nothing
        held = sorted(set(source.frames["validation"]["label"]))
        if len(held) < 2:
            raise DataError(f"--task: {source.locations['validation']} has only one class ({held[0]!r}) in column "
                            f"{columns.label!r}; the validation rows rank the trials, so they need at least two")
    return label_names


def _arrange(source: Source, ids: dict[str, int], requested: dict[str, int], seed: int,
             open_answers: bool) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Each split's rows and how they were made: the splits the source lacks carved from its train rows
    (stratified, seeded; random where open answers are too varied to stratify), the ones it has kept (capped
    at their size by a seeded stratified sample, or a random one keeping every class: _cap)."""
    pool = "train" if "train" in source.frames else "all"
    carved = [s for s in SPLITS if s == "train" or s not in source.frames]
    if carved == ["train"]:  # the source has every split: keep its train rows as they are (capped)
        carved = []
    labels = _class_ids(source.frames[pool], ids)
    where = f"--task: {source.locations[pool]}"
    rows, stratify = _carve(labels, [requested[s] for s in carved], seed, where, carved, list(ids),
                            open_answers) if carved else ([], True)
    frames = {s: source.frames[pool].iloc[r] for s, r in zip(carved, rows, strict=True)}
    how = "stratified" if stratify else "random (answers too varied to stratify)"
    origins = {s: f"seeded {how} split of {source.origins[pool]}" for s in carved}
    for split in SPLITS:
        if split not in frames:
            frame = source.frames[split]
            if split == "train" and not open_answers:  # a sample without a class would meet it unseen in validation
                held = len(set(frame["label"]))
                _require_a_row_per_class([min(requested[split], len(frame))], [split], held,
                                         f"--task: {source.locations[split]}", None)
            kept, how = _cap(_class_ids(frame, ids), requested[split], seed)
            frames[split] = frame.iloc[kept]
            sampled = len(kept) < len(frame)
            origins[split] = source.origins[split] + (
                f", seeded {how} sample of {len(kept)} of {len(frame)} rows" if sampled else "")
    return frames, origins


def _refuse_one_class_validation(kept: pd.DataFrame, columns: Columns, where: str) -> None:
    """A validation file of several classes cut to a --val-size below their count keeps fewer: one class would
    rank nothing (the whole file is checked for two in _checked_label_names)."""
    held = sorted(set(kept["label"]))
    if len(held) < 2:
        raise DataError(f"{where} cut to {len(kept)} row{'s' * (len(kept) > 1)} (--val-size) keeps only one class "
                        f"({held[0]!r}) in column {columns.label!r}; the validation rows rank the trials, so they need "
                        "at least two: raise --val-size")


def _carve(labels: list[int], sizes: list[int], seed: int, where: str, names: list[str], classes: list[str],
           open_answers: bool) -> tuple[list[list[int]], bool]:
    """The carved splits' rows, and whether they are stratified. Open answers too varied to put a row of each in
    every split (or that the class-wise split fails for) are split at random: an answer need not be in train."""
    if not open_answers:
        return _stratified_parts(labels, sizes, seed, where, names, classes), True
    if _stratifiable(labels, sizes):
        with contextlib.suppress(RareClassError):
            return _stratified_parts(labels, sizes, seed, where, names, classes), True
    return _stratified_parts(labels, sizes, seed, where, names, classes, stratify=False), False


def _stratifiable(labels: list[int], sizes: list[int]) -> bool:
    """Whether open answers can be split by answer: each has a row for every split, and every split has room
    for a row of each (a train split of 20 rows cannot hold 40 answers, however many rows each has)."""
    return min(Counter(labels).values()) >= len(sizes) and \
        min(_scaled_sizes(len(labels), sizes)) >= len(set(labels))


def _strip_answers(frame: pd.DataFrame) -> None:
    """Open answers: "2 " and "2" are one answer (a generated one is compared without surrounding spaces)."""
    frame["label"] = frame["label"].str.strip()


def load_eval_split(task: str, *, label_names: list[str], columns: Columns | None = None, max_rows: int,
                    seed: int, option: str = "--ood-task", open_answers: bool = False) -> TextSplit:
    """An extra evaluation set (e.g. out of distribution) labelled with the main task's classes: a source's
    test split, else its validation split, else all its rows; at most `max_rows` (seeded, stratified)."""
    columns = columns or Columns()
    frame, where = _eval_frame(task, columns, option, open_answers)
    check_known_labels(frame, label_names, columns, where, "the training task")
    ids = {name: i for i, name in enumerate(label_names)}
    kept, _ = _cap(_class_ids(frame, ids), max_rows, seed)
    return _text_split(frame.iloc[kept], ids, columns)


def with_eval_answers(task: TaskData, eval_task: str, columns: Columns | None = None,
                      option: str = "--ood-task") -> TaskData:
    """`task` with the answers of an extra evaluation set that it lacks appended to its label names (open
    answers: an out-of-distribution question has answers of its own); the task's own ids are unchanged."""
    frame, _ = _eval_frame(eval_task, columns or Columns(), option, open_answers=True)
    known = set(task.label_names)
    new = sorted({label for label in frame["label"] if label not in known}, key=_natural)
    return dataclasses.replace(task, label_names=[*task.label_names, *new])


def _eval_frame(task: str, columns: Columns, option: str, open_answers: bool = False) -> tuple[pd.DataFrame, str]:
    """The rows an extra evaluation set is scored on (its test split, else validation, else all), checked."""
    source = read_source(task, columns, option)
    split = next(s for s in ("test", "validation", "all", "train") if s in source.frames)
    frame, where = source.frames[split], f"{option}: {source.locations[split]}"
    if columns.text_pair and "text_pair" not in frame:  # a packaged task's columns are fixed: single texts
        raise DataError(f"{where} has single texts (no second text column), but the task is one of sentence "
                        f"pairs; give an {option} of sentence pairs")
    check_rows(frame, columns, where)
    if open_answers:
        _strip_answers(frame)
    return frame, where


def check_rows(frame: pd.DataFrame, columns: Columns, where: str) -> None:
    """Every row has a non-empty text (and second text) and a label."""
    if frame.empty:
        raise DataError(f"{where} has no rows")
    text_columns = [("text", columns.text)] + ([("text_pair", columns.text_pair)] if columns.text_pair else [])
    for key, user_name in text_columns:
        empty = frame[key].map(lambda t: not isinstance(t, str) or not t.strip())
        if empty.any():
            raise DataError(f"{where} has empty texts in column {user_name!r} (rows {row_numbers(empty)}); "
                            "every row needs a non-empty text")
    missing = frame["label"].map(lambda label: not isinstance(label, str) or not label.strip())  # "" and "  " too
    if missing.any():
        raise DataError(f"{where} has rows without a label (missing, empty or blank) in column {columns.label!r} "
                        f"(rows {row_numbers(missing)})")


def check_known_labels(frame: pd.DataFrame, label_names: list[str], columns: Columns, where: str,
                       reference: str) -> None:
    unseen = sorted(set(frame["label"]) - set(label_names), key=_natural)
    if unseen:
        more = f", ... ({len(label_names)} in all)" if len(label_names) > 10 else ""
        allowed = ", ".join(label_names[:10]) + more
        raise DataError(f"{where} has labels {', '.join(map(repr, unseen[:5]))} in column {columns.label!r} that "
                        f"do not occur in {reference}; allowed: {allowed}")


def _natural(name: str) -> tuple[int, float, str]:
    """Numbers in numeric order (2 before 10), then names in alphabetical order."""
    return (0, float(name), name) if re.fullmatch(r"-?\d+(\.\d+)?", name) else (1, 0.0, name)


def _label_names(frame: pd.DataFrame, columns: Columns, where: str) -> list[str]:
    names = sorted(set(frame["label"]), key=_natural)
    if len(names) < 2:
        raise DataError(f"{where} has only one class ({names[0]!r}) in column {columns.label!r}; "
                        "a classification task needs at least two")
    return names


def _refuse_near_duplicates(names: list[str], columns: Columns, where: str) -> None:
    """Labels that differ only in case, surrounding spaces or how Unicode writes them ('pos', 'pos ', 'Pos';
    'né' composed or as e + accent; a zero-width space) are almost always one class written several ways; trained as
    separate classes they split it, and accuracy falls for no visible reason."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_label_key(name), []).append(name)
    clashing = [group for group in groups.values() if len(group) > 1]
    if clashing:
        shown = "; ".join(", ".join(ascii(n) if not n.isascii() else repr(n) for n in group) for group in clashing[:3])
        raise DataError(f"{where} has labels in column {columns.label!r} that differ only in case, surrounding "
                        f"spaces or invisible Unicode differences ({shown}); write each class one way")


def _label_key(name: str) -> str:
    """What a person reads: compatibility-normalized, invisible format characters (zero-width space) dropped."""
    visible = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    return visible.strip().casefold()


def _class_ids(frame: pd.DataFrame, ids: dict[str, int]) -> list[int]:
    return [ids[label] for label in frame["label"]]


def _stratified_parts(labels: list[int], sizes: list[int], seed: int, where: str,
                      names: list[str], classes: list[str], stratify: bool = True) -> list[list[int]]:
    """Disjoint row lists of about `sizes` rows (proportionally fewer when the table is smaller), each with
    the table's class proportions (unless not `stratify`: seeded random rows). The first part is the training
    split; the last takes what remains."""
    from sklearn.model_selection import train_test_split

    total = min(len(labels), sum(sizes))
    scaled = _scaled_sizes(len(labels), sizes)
    if stratify and min(Counter(labels).values()) >= len(sizes):  # else rare classes are the problem, below
        _require_a_row_per_class(scaled, names, len(set(labels)), where, total if total < sum(sizes) else None)
    index = list(range(len(labels)))
    try:
        if total < len(labels):
            index, _ = train_test_split(index, train_size=total, stratify=labels if stratify else None,
                                        random_state=seed)
            if stratify:  # a class of 3 rows in 1000 gets none of a stratified 80: it would vanish from every split
                kept = _with_every_class(sorted(index), labels, seed, per_class=len(sizes))
                # in the drawn order when nothing was added: the splits below take rows by position, and studies
                # recorded before this must keep their rows
                index = index if set(kept) == set(index) else kept
        parts = []
        for size in scaled[:-1]:
            part, index = train_test_split(index, train_size=size, random_state=seed,
                                           stratify=[labels[i] for i in index] if stratify else None)
            parts.append(part)
    except ValueError as exc:  # e.g. a class with a single row cannot be in both halves of a split
        raise RareClassError(f"{where}: cannot split {len(labels)} rows by class into {' / '.join(names)} of about "
                        f"{' / '.join(map(str, scaled))} rows: {_rarest(labels, classes)}; every class needs "
                        "a row in each split (drop or merge rare classes, or give validation and test "
                        "files)") from exc
    if stratify:
        _refuse_classes_missing_from_train(parts[0], labels, classes, where)
    return parts + [index]


def _refuse_classes_missing_from_train(train: list[int], labels: list[int], classes: list[str], where: str) -> None:
    """A stratified split rounds a rare class's share of a small train split down to no row: the class would
    then be scored in validation and test but never trained on."""
    missing = sorted(set(labels) - {labels[i] for i in train})
    if missing:
        counts = Counter(labels)
        shown = ", ".join(f"{_short(classes[c])!r} ({counts[c]} of {len(labels)} rows)" for c in missing[:3])
        raise RareClassError(f"{where}: the stratified train split has no row of {shown}, so it would be scored "
                             "but never trained on; raise --train-size, or drop or merge rare classes")


def _scaled_sizes(rows: int, sizes: list[int]) -> list[int]:
    """The requested sizes, scaled down in proportion when the table holds fewer rows than they add up to."""
    scale = min(rows, sum(sizes)) / sum(sizes)  # a small file keeps the requested proportions
    return [max(1, int(n * scale)) for n in sizes]


SIZE_OPTIONS = {"train": "--train-size", "validation": "--val-size", "test": "--test-size"}


def _require_a_row_per_class(sizes: list[int], names: list[str], classes: int, where: str,
                             rows_when_scaled: int | None) -> None:
    """A stratified split needs a row of every class: a size below the class count is the user's to raise. When
    the table held fewer rows than asked for (`rows_when_scaled`), every split shrank with it, so raising one
    size changes nothing: the advice is sizes that fit the table."""
    for name, size in zip(names, sizes, strict=True):
        if size >= classes:
            continue
        problem = f"{where}: a {name} split of {size} row{'s' if size > 1 else ''} cannot hold a row of each of the {classes} classes"
        if rows_when_scaled is None:
            raise DataError(f"{problem}; {SIZE_OPTIONS[name]} must be at least {classes}")
        train = rows_when_scaled - classes * (len(names) - 1)
        if train < classes:
            raise DataError(f"{problem}, and the table's {rows_when_scaled} rows are too few for {len(names)} such "
                            "splits; add rows, or give validation and test files")
        fitting = " ".join(f"{SIZE_OPTIONS[n]} {train if n == 'train' else classes}" for n in names)
        raise DataError(f"{problem} (the table holds {rows_when_scaled} rows, fewer than asked for, so every split was "
                        f"scaled down); ask for {rows_when_scaled} rows or fewer in all, e.g. {fitting}")


def _rarest(labels: list[int], classes: list[str]) -> str:
    """How many classes the rows hold and the rarest few, by name (a text column given as the label column
    shows up here as nearly one class per row)."""
    counts = pd.Series(labels).value_counts()
    rarest = ", ".join(f"{_short(classes[c])!r} {n} row{'s' if n > 1 else ''}"
                       for c, n in counts.sort_values(kind="stable").head(3).items())
    return f"{len(counts)} classes, the rarest {rarest}"


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cap(labels: list[int], size: int, seed: int) -> tuple[list[int], str]:
    """All rows in file order, or a seeded sample of `size` of them and how it was drawn: stratified, or where
    a class is too rare to stratify (a single row) random, with a row of each class while `size` has room."""
    from sklearn.model_selection import train_test_split

    index = list(range(len(labels)))
    if len(labels) <= size:
        return index, "whole"
    try:
        kept, _ = train_test_split(index, train_size=size, stratify=labels, random_state=seed)
        return _with_every_class(sorted(kept), labels, seed), "stratified"  # rounding can drop a rare class
    except ValueError:
        kept, _ = train_test_split(index, train_size=size, random_state=seed)
        return _with_every_class(sorted(kept), labels, seed), "random"


def _with_every_class(kept: list[int], labels: list[int], seed: int, per_class: int = 1) -> list[int]:
    """`kept` with up to `per_class` rows of each class (as many as it has), each added in place of a row of the
    class it holds most of (while that one keeps more than `per_class`): a sample mostly drops a class of one
    row, and could leave a validation set with one class. A sample that lacks none is returned as drawn (studies
    recorded before this keep their rows)."""
    import random

    rng, rows = random.Random(seed), list(kept)
    taken, held, total = set(rows), Counter(labels[i] for i in rows), Counter(labels)
    for label in dict.fromkeys(labels[i] for i in rng.sample(range(len(labels)), len(labels))):
        while held[label] < min(per_class, total[label]):
            common = max(held, key=lambda c: held[c])
            if held[common] <= per_class:
                break
            dropped = rng.choice([i for i in rows if labels[i] == common])
            added = next(i for i in range(len(labels)) if labels[i] == label and i not in taken)
            rows.remove(dropped)
            rows.append(added)
            taken.discard(dropped)
            taken.add(added)
            held[common] -= 1
            held[label] += 1
    return sorted(rows)


def _text_split(frame: pd.DataFrame, ids: dict[str, int], columns: Columns) -> TextSplit:
    pairs = frame["text_pair"].tolist() if columns.text_pair else None
    return TextSplit(frame["text"].tolist(), _class_ids(frame, ids), pairs)


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids without padding (padding happens per batch) and labels: one class per row
    (classification), or one target id per token with -100 where nothing is learned (causal LM)."""

    input_ids: list[list[int]]
    labels: torch.Tensor | list[list[int]]
    pad_left: bool = False  # decoders: the last position is then always a real token (classification)
    token_type_ids: list[list[int]] | None = None  # sentence pairs on a model with segment embeddings (BERT)

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def spread(self, rows: int) -> TokenizedSplit:
        """At most `rows` rows, evenly spaced over the split: a file ordered by label (many ship so) gives a
        slice of every part of it, where its first rows would hold one class."""
        return self.subset(sorted({i * len(self) // rows for i in range(rows)}) if len(self) > rows else
                           list(range(len(self))))

    def subset(self, rows: list[int]) -> TokenizedSplit:
        labels = self.labels[rows] if isinstance(self.labels, torch.Tensor) else [self.labels[i] for i in rows]
        segments = None if self.token_type_ids is None else [self.token_type_ids[i] for i in rows]
        return TokenizedSplit([self.input_ids[i] for i in rows], labels, self.pad_left, segments)


def tokenize(split: TextSplit, tokenizer: Any, max_length: int, *, segments: bool = False) -> TokenizedSplit:
    """Classification rows. Sentence pairs are encoded as pairs by the tokenizer (BERT: [CLS] a [SEP] b
    [SEP], truncating the longer text first), with the segment ids that tell a model with segment
    embeddings which text a token is in (`segments`: as `tokenizer(a, b)` gives them to a user of the export).
    A tokenizer without a separator token (GPT-2, SmolLM2) would run the two texts together, so there the
    second text starts on a new line."""
    _refuse_no_room_for_text(tokenizer, max_length, pair=split.pairs is not None)
    if split.pairs is None:
        encoded = tokenizer(split.texts, truncation=True, max_length=max_length)
    else:
        pairs = split.pairs if tokenizer.sep_token is not None else ["\n" + p for p in split.pairs]
        encoded = tokenizer(split.texts, pairs, truncation=True, max_length=max_length)
    kept = segments and split.pairs is not None and "token_type_ids" in encoded
    return TokenizedSplit(list(encoded["input_ids"]), torch.tensor(split.labels, dtype=torch.long),
                          pad_left=tokenizer.padding_side == "left",
                          token_type_ids=list(encoded["token_type_ids"]) if kept else None)


def _refuse_no_room_for_text(tokenizer: Any, max_length: int, *, pair: bool) -> None:
    """A --max-length the special tokens fill leaves rows of [CLS] [SEP] alone (or, below their count, rows the
    tokenizer does not truncate at all): every text would need at least one token of its own."""
    needed = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if max_length < needed:
        what = "a pair of texts" if pair else "a text"
        raise DataError(f"--max-length: {max_length} leaves no room for {what}: the tokenizer adds "
                        f"{needed - (2 if pair else 1)} special tokens to each row; use --max-length {needed} or more")


def has_segment_embeddings(model: Any) -> bool:
    """Whether the model learned an embedding per segment (BERT's two), so a pair's segment ids matter."""
    return getattr(model.config, "type_vocab_size", 0) > 1


def collate(split: TokenizedSplit, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch only (on the left for decoders)."""
    width = max(len(split.input_ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    per_token = not isinstance(split.labels, torch.Tensor)
    labels = torch.full((len(rows), width), -100, dtype=torch.long) if per_token else split.labels[rows]
    segments = None if split.token_type_ids is None else torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        ids = split.input_ids[i]
        place = slice(width - len(ids), width) if split.pad_left else slice(0, len(ids))
        input_ids[r, place] = torch.tensor(ids)
        mask[r, place] = 1
        if per_token:
            labels[r, place] = torch.tensor(split.labels[i])
        if segments is not None:
            segments[r, place] = torch.tensor(split.token_type_ids[i])  # type: ignore[index]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if split.pad_left:  # positions count from each row's first real token, whatever the batch's padding
        batch["position_ids"] = left_padded_positions(mask)
    return batch if segments is None else {**batch, "token_type_ids": segments}


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows. transformers numbers the columns instead, which shifts a row by its
    padding: harmless with rotary positions (Llama: only distances count), wrong with absolute ones (GPT-2),
    where a row's score then depended on the longest row batched with it."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """What a classifier's forward takes from a batch (segment ids only when the split has them, positions
    only when it is left-padded)."""
    names = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    return {name: batch[name].to(device) if device else batch[name] for name in names if name in batch}


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           group: int = 50) -> list[list[int]]:
    """One epoch of shuffled batches whose rows have similar lengths, so little compute goes to padding.

    Shuffle, cut into mega-batches of `group` batches, sort each by length, cut into batches, shuffle the
    batches: still random across epochs, but a batch rarely mixes a 10-token and a 60-token text.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = batch_size * group
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


# Padded positions an evaluation batch may hold under a memory budget (None: no limit). The budget bounds a
# trial's training step; an inference pass over no more positions than one training micro-batch keeps less
# (one layer's activations at a time, not every layer's for backward), so a trial's evaluations and probes,
# the base model's scores and the export's test score stay inside the budget too (search.eval_positions).
# Measured on an H200: experiments/search/gpu_trial_memory.md.
_EVAL_POSITIONS: ContextVar[int | None] = ContextVar("eval_positions", default=None)


@contextlib.contextmanager
def eval_positions_limited(positions: int | None) -> Iterator[None]:
    """Within this block, `eval_batches` cuts batches at `positions` padded positions (None: no limit)."""
    token = _EVAL_POSITIONS.set(positions)
    try:
        yield
    finally:
        _EVAL_POSITIONS.reset(token)


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches sorted by length: evaluation order does not matter, padding does. At most `batch_size`
    rows, and within `eval_positions_limited` at most that many padded positions (a row longer than the
    limit still gets a batch of its own)."""
    limit = _EVAL_POSITIONS.get()
    batches: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        rows = batches[-1]  # ascending lengths: row i would set the batch's width
        if len(rows) == batch_size or (rows and limit is not None and (len(rows) + 1) * lengths[i] > limit):
            batches.append(rows := [])
        rows.append(i)
    return batches if batches[0] else []
