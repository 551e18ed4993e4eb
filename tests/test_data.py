from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopeft.data import TokenizedSplit, collate, length_grouped_batches, load_task
from autopeft.errors import DataError


def test_packaged_task_split_is_stratified_disjoint_and_seeded() -> None:
    task = load_task("packaged:rotten_tomatoes", seed=0, train_size=4000, val_size=1000, test_size=1000)
    assert task.label_names == ["fresh", "rotten"]
    sizes = [len(s.texts) for s in (task.train, task.validation, task.test)]
    assert sizes == [4000, 1000, 1000]
    assert not set(task.train.texts) & set(task.validation.texts) and not set(task.validation.texts) & set(task.test.texts)
    for split in (task.train, task.validation, task.test):  # fresh is 57.8% of the 12,752 snippets
        assert abs(split.labels.count(0) / len(split.labels) - 0.578) < 0.01
    again = load_task("packaged:rotten_tomatoes", seed=0, train_size=4000, val_size=1000, test_size=1000)
    assert again.describe() == task.describe()
    other = load_task("packaged:rotten_tomatoes", seed=1, train_size=4000, val_size=1000, test_size=1000)
    assert other.describe()["train_fingerprint"] != task.describe()["train_fingerprint"]


@pytest.mark.parametrize(("content", "message"), [
    ("text,label\na,1\nb,1\n", "only one class"),
    ("words,label\na,1\nb,0\n", "has no column 'text'"),
    ("text,label\na,1\n ,0\n", "empty texts"),
])
def test_bad_task_files_are_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "task.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_task(str(path), seed=0, train_size=10, val_size=2, test_size=2)


def test_collate_pads_to_the_batch_and_masks_padding() -> None:
    split = TokenizedSplit([[5, 6, 7], [8]], torch.tensor([1, 0]))
    batch = collate(split, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_length_grouping_covers_every_row_once_and_cuts_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (2000,), generator=gen).tolist()
    batches = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(2000))

    def padding(bs: list[list[int]]) -> float:
        return 1 - sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in bs)

    shuffled = torch.randperm(2000, generator=gen).tolist()
    assert padding(batches) < 0.1 < padding([shuffled[i:i + 16] for i in range(0, 2000, 16)])
