"""Opening a study's store: a new sqlite store may go in a new folder; one that cannot be made is one line."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autopeft.config import SearchConfig
from autopeft.errors import StudyError
from autopeft.study import connect


def test_a_new_sqlite_store_may_go_in_a_new_folder(tmp_path: Path) -> None:
    storage = connect(SearchConfig(storage=f"sqlite:///{tmp_path}/runs/march/a.db"))
    optuna.create_study(storage=storage, study_name="s")
    assert (tmp_path / "runs" / "march" / "a.db").is_file()


def test_a_store_folder_that_cannot_be_made_is_named_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StudyError, match=r"^--storage: cannot open sqlite:///.*/a-file/a\.db: ") as caught:
        connect(SearchConfig(storage=f"sqlite:///{tmp_path}/a-file/a.db"))
    assert "\n" not in str(caught.value)
