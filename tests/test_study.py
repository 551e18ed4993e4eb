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
