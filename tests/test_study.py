"""Opening a study's store (a new sqlite store may go in a new folder; one that cannot be made is one line) and
seeding its sampler."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autopeft.config import SearchConfig
from autopeft.errors import StudyError
from autopeft.study import connect, seeded_sampler


def test_a_new_sqlite_store_may_go_in_a_new_folder(tmp_path: Path) -> None:
    storage = connect(SearchConfig(storage=f"sqlite:///{tmp_path}/runs/march/a.db"))
    optuna.create_study(storage=storage, study_name="s")
    assert (tmp_path / "runs" / "march" / "a.db").is_file()


def test_a_store_folder_that_cannot_be_made_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StudyError, match=r"^--storage: cannot open sqlite:///.*/a-file/a\.db: ") as caught:
        connect(SearchConfig(storage=f"sqlite:///{tmp_path}/a-file/a.db"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_a_workers_sampler_takes_any_process_id_as_its_worker_id(sampler: str) -> None:
    """A worker's id defaults to its process id, up to 2**22 on Linux; Optuna refuses seeds from 2**32 on."""
    study = optuna.create_study()
    config = SearchConfig(seed=2**32 - 1, worker_id=4_194_303, sampler=sampler)
    study.sampler = seeded_sampler(config, study)  # raised "Seed must be between 0 and 2**32 - 1"
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(study.trials) == 1


def test_a_worker_not_told_the_tracking_store_takes_the_studys_unless_its_password_was_withheld() -> None:
    from autopeft.study import recorded_tracking_uri

    assert recorded_tracking_uri({"tracking_uri": "http://10.0.0.5:5000"}) == "http://10.0.0.5:5000"
    with pytest.raises(StudyError, match=r"--tracking-uri: the study logs to http://u:\*\*\*@h:5000, whose password"):
        recorded_tracking_uri({"tracking_uri": "http://u:***@h:5000"})


def test_a_relative_sqlite_tracking_store_is_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recorded = SearchConfig(tracking_uri="sqlite:///runs/mlflow.db").public_dict()["tracking_uri"]
    assert recorded == f"sqlite:///{tmp_path}/runs/mlflow.db"


@pytest.mark.parametrize("name", ["te", "e", "lite", "runs/mlflow.db"])
def test_a_relative_sqlite_file_is_made_absolute_whatever_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    name: str) -> None:
    from autopeft.config import absolute_sqlite_url

    monkeypatch.chdir(tmp_path)  # "sqlite:///te" once became "sqli/.../te:///te"
    assert absolute_sqlite_url(f"sqlite:///{name}") == f"sqlite:///{tmp_path}/{name}"


def test_a_splits_origin_worded_anew_over_the_same_rows_is_no_change() -> None:
    """Session 31 named a fallback sample 'random' where the study recorded 'stratified': its resume and export
    were refused as "other rows in validation", though the rows were the same."""
    from autopeft.study import _split_changes

    recorded = {"validation_origin": "file v.csv, seeded stratified sample of 6 of 31 rows", "validation_fingerprint": "ab"}
    now = {**recorded, "validation_origin": "file v.csv, seeded random sample of 6 of 31 rows"}
    assert _split_changes(recorded, now) == []
    assert _split_changes(recorded, {**now, "validation_fingerprint": "cd"}) == ["other rows in validation"]


def test_a_resume_names_the_strategy_settings_it_changes_in_values_a_user_can_type(tmp_path: Path) -> None:
    """'--prune-after None' was printed, and a --prune-after change named when no pruner runs."""
    from autopeft.study import strategy_changes

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.set_user_attr("config", {"sampler": "random", "pruner": "median", "prune_after": 2})
    assert strategy_changes(SearchConfig(study="s", storage=storage)) == [
        "--sampler tpe (it ran with --sampler random before)", "--pruner none (it ran with --pruner median before)"]
    assert strategy_changes(SearchConfig(study="s", storage=storage, sampler="random", objective_mode="scalar",
                                         pruner="median")) == [
        "--prune-after at its default (it ran with --prune-after 2 before)"]
    assert strategy_changes(SearchConfig(study="other", storage=storage)) == []
