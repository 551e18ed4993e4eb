from __future__ import annotations

from pathlib import Path

import pytest

from autopeft.config import SearchConfig, parse_memory
from autopeft.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5 GiB", int(1.5 * 2**30)),
                                                ("1024", 1024)])
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["-1GiB", "eight", "8 parsecs", "0GiB", ""])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        parse_memory(text)


def test_config_collects_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        SearchConfig(trials=-1, max_steps=-1, study="a b", space="/no/such.yaml")
    assert len(info.value.problems) == 4


@pytest.mark.parametrize(("overrides", "message"), [
    ({"objective_mode": "scalar", "forgetting_weight": float("nan")}, "--forgetting-weight: nan must be a finite number"),
    ({"objective_mode": "scalar", "forgetting_weight": float("inf")}, "--forgetting-weight: inf must be a finite number"),
    ({"heartbeat_seconds": 0}, "--heartbeat: 0 must be between 1 and 100000000 (seconds)"),
    ({"heartbeat_seconds": 10**11}, "--heartbeat: 100000000000 must be between 1 and 100000000 (seconds)"),
    ({"timeout": float("nan")}, "--timeout: nan must be a positive, finite number of seconds"),
    ({"tracking_uri": "mlflow.db"}, "--tracking-uri: 'mlflow.db' is not a store MLflow logs to; use sqlite:///mlflow.db"),
    ({"tracking_uri": "file:///tmp/mlruns"}, "--tracking-uri: 'file:///tmp/mlruns' is not a store MLflow logs to"),
    ({"tracking_uri": "foo://bar"}, "--tracking-uri: 'foo://bar' is not a store MLflow logs to"),
    ({"max_consecutive_failures": 0}, "--max-consecutive-failures: 0 must be at least 1"),
    ({"objective_mode": "scalar", "pruner": "hyperband", "max_steps": 1},  # pruned at its last step, once trained
     "--pruner: hyperband needs --max-steps 2 or more (a one-step trial has no step before its end to stop it at)"),
    ({"space": "."}, "--space: . is a folder; give a search-space YAML file"),
    ({"task_type": "causal_lm", "template": "Review: {text!r}"}, "may hold plain {text} and {text_pair} fields only"),
    ({"text_pair_column": "label"}, "--text-pair-column 'label': each must name a different column"),
    ({"ood_text_column": "sentence"}, "--ood-text-column: needs --ood-task (it names a column of that set)"),
    ({"ood_task": "ood.csv", "ood_text_pair_column": "hypothesis"},
     "--ood-text-pair-column: the task has no second text (--text-pair-column)"),
    ({"ood_task": "ood.csv", "ood_text_column": "y", "ood_label_column": "y"},  # the OOD texts were its labels
     "--ood-text-column 'y', --ood-label-column 'y': each must name a different column"),
    ({"ood_task": "ood.csv", "ood_text_column": "label"},  # the other is the task's --label-column
     "--ood-text-column 'label', --label-column 'label': each must name a different column"),
])
def test_a_bad_setting_is_named_with_what_is_allowed(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SearchConfig(**overrides)
    assert message in str(info.value)


RECIPE_EDITS = [
    (("learning_rate:", "learning_rat:"), "learning_rat: unknown key; allowed: model, task"),
    (("  r: 8", "  rank: 8"), "method_params.rank: unknown parameter of lora; allowed: r, alpha"),
    (("seed: 3", "seed: banana"), "seed: 'banana' must be an integer of at least 0"),
    (("split_seed: 0", "split_seed: 1.5"), "split_seed: 1.5 must be an integer of at least 0"),
    (("max_steps: 3", "max_steps: -3"), "max_steps: -3 must be an integer of at least 1"),
    (("max_steps: 3", "max_steps: 3\nsplit_fingerprints: [a, b]"), "split_fingerprints: must map split names to"),
    (("task_type: classification", "task_type: bogus"), "task_type: 'bogus' must be classification or causal_lm"),
    (("learning_rate: 0.001", "learning_rate: .nan"), "learning_rate: nan must be a finite number"),  # a traceback
    # a problem naming two keys was worded in search's options, and named no file
    (("text_column: text", "text_column: label"), "text_column 'label', label_column 'label': each must name a"),
    (("effective_batch_size: 0", "effective_batch_size: 48"),  # read, and trained at 16 without a word
     "effective_batch_size: 48 is not micro_batch_size x grad_accum_steps (16 x 1); set grad_accum_steps: 3, or"),
]


@pytest.mark.parametrize(("edit", "message"), RECIPE_EDITS, ids=[m for _, m in RECIPE_EDITS])
def test_a_recipe_refuses_unknown_keys_and_wrong_values_naming_its_file_and_key(tmp_path, edit, message) -> None:
    """A misspelt key trained on the default without a word; a wrong kind of value gave a traceback."""
    from autopeft import methods
    from autopeft.recipe import read_recipe, write_recipe
    from autopeft.space import TRAINING_PARAMS, TrialParams

    path = tmp_path / "training.yaml"
    training = {k: spec.default for k, spec in TRAINING_PARAMS.items()}
    write_recipe(path, SearchConfig(model="m", max_steps=3), TrialParams("lora", methods.get("lora").resolve({}), training), 3)
    read_recipe(path)  # as written, it reads
    path.write_text(path.read_text().replace(f"\n{edit[0]}", f"\n{edit[1]}", 1))
    with pytest.raises(ConfigError) as info:
        read_recipe(path)
    assert [problem.split(": ", 1)[0] for problem in info.value.problems] == [str(path)]
    assert message in info.value.problems[0]


def test_a_recipes_whole_numbers_written_as_floats_are_read_as_integers(tmp_path: Path) -> None:
    """`micro_batch_size: 8.0` passed the check and stopped train and estimate with a TypeError."""
    from autopeft import methods
    from autopeft.recipe import read_recipe, write_recipe
    from autopeft.space import TRAINING_PARAMS, TrialParams

    path = tmp_path / "training.yaml"
    training = {k: spec.default for k, spec in TRAINING_PARAMS.items()}
    write_recipe(path, SearchConfig(model="m", max_steps=3), TrialParams("lora", methods.get("lora").resolve({}), training), 3)
    text = path.read_text().replace("\nmicro_batch_size: 16", "\nmicro_batch_size: 16.0", 1)
    path.write_text(text.replace("\ngrad_accum_steps: 1", "\ngrad_accum_steps: 1.0", 1).replace("  r: 8", "  r: 8.0", 1))
    _, params, _ = read_recipe(path)
    for value in (params.training["micro_batch_size"], params.training["grad_accum_steps"], params.method_params["r"]):
        assert type(value) is int
    assert (params.training["micro_batch_size"], params.method_params["r"]) == (16, 8)


def test_an_ood_sets_columns_are_checked_only_where_an_ood_option_names_one() -> None:
    SearchConfig(ood_task="ood.csv")  # the task's columns, already checked as the task's
    with pytest.raises(ConfigError) as info:
        SearchConfig(text_column="label", ood_task="ood.csv")
    assert len(info.value.problems) == 1  # once, under the options the user gave


def test_a_locked_mlflow_store_is_not_called_a_foreign_one(tmp_path: Path) -> None:
    """A store another process holds locked read as 'holds no MLflow tables' after a 5 s wait."""
    import sqlite3

    from autopeft.config import sqlite_without_mlflow

    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE experiments (id INTEGER)")
        db.execute("CREATE TABLE runs (id INTEGER)")
    (tmp_path / "notes.db").write_text("not a database")
    assert sqlite_without_mlflow(f"sqlite:///{store}") is None
    assert sqlite_without_mlflow(f"sqlite:///{tmp_path / 'notes.db'}") == str(tmp_path / "notes.db")
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert sqlite_without_mlflow(f"sqlite:///{store}") is None
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_recipe_whose_values_break_their_methods_rule_together_is_refused(tmp_path: Path) -> None:
    """AdaLoRA's target_r above its init_r, each allowed alone: train built it, failed, and left a FAILED run."""
    from autopeft import methods
    from autopeft.recipe import read_recipe, write_recipe
    from autopeft.space import TRAINING_PARAMS, TrialParams

    path = tmp_path / "training.yaml"
    training = {k: spec.default for k, spec in TRAINING_PARAMS.items()}
    adalora = methods.get("adalora").resolve({"init_r": 4, "target_r": 8})
    write_recipe(path, SearchConfig(model="m", max_steps=3), TrialParams("adalora", adalora, training), 3)
    with pytest.raises(ConfigError) as info:
        read_recipe(path)
    assert info.value.problems == [(f"{path}: method_params: target_r (at least 8) must be below init_r (at most 4): "
                                   "the rank budget can only shrink")]
