from pathlib import Path

import pytest

from autopeft.tracking import Tracker


def test_files_logged_to_a_sqlite_store_land_beside_it_not_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "started-here"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = tmp_path / "stores" / "mlflow.db"
    store.parent.mkdir()
    tracker = Tracker(f"sqlite:///{store}")
    run = tracker.start_run("a run", {"r": 8})
    note = tmp_path / "note.txt"
    note.write_text("adapter config")
    tracker.log_file(run, note)
    assert list((store.parent / "mlruns").rglob("note.txt"))
    assert not (elsewhere / "mlruns").exists()
