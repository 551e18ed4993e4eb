import multiprocessing
import warnings
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


def test_one_relative_store_url_used_from_two_folders_logs_to_each_folders_own_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow keeps one store per URL string for the life of the process: a notebook (or any caller of the Python
    API) that ran a search in one folder and then in another logged the second one's runs into the first
    folder's mlflow.db."""
    from mlflow.tracking import MlflowClient

    names = {}
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        names[folder] = Tracker("sqlite:///mlflow.db").start_run(f"run in {folder}", {"a": 1})
    for folder, run_id in names.items():
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / folder / 'mlflow.db'}")
        assert client.get_run(run_id).info.run_name == f"run in {folder}"


def test_a_store_deleted_between_two_searches_of_one_process_is_created_again_and_logged_to(tmp_path: Path) -> None:
    """A notebook that deletes its results folder and searches again: MLflow's cached store kept its connection
    to the deleted file, and the second search crashed with "attempt to write a readonly database"."""
    import shutil

    from mlflow.tracking import MlflowClient

    folder = tmp_path / "results"
    url = f"sqlite:///{folder / 'mlflow.db'}"
    for attempt in ("first", "second"):
        folder.mkdir()
        tracker = Tracker(url)
        run_id = tracker.start_run(f"{attempt} search", {"a": 1})
        assert tracker.uri == url  # not the fallback store
        assert MlflowClient(tracking_uri=url).get_run(run_id).info.run_name == f"{attempt} search"
        if attempt == "first":
            shutil.rmtree(folder)


def _open_and_log(database: str) -> tuple[str, list[str]]:
    """One worker process's first contact with the tracking store (run in a fresh interpreter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(f"sqlite:///{database}")
        tracker.start_run("worker", {"a": 1})
    return tracker.uri, [str(w.message) for w in caught if "unreachable" in str(w.message)]


def test_workers_that_create_a_new_sqlite_store_at_once_all_log_to_it(tmp_path: Path) -> None:
    """MLflow creates a new SQLite store's tables on first contact; four processes doing it at once failed with
    "duplicate column name" or "table ... already exists", and a search's worker crashed or fell back."""
    database = str(tmp_path / "mlflow.db")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        opened = pool.map(_open_and_log, [database] * 4)
    assert opened == [(f"sqlite:///{database}", [])] * 4
    store = Tracker(f"sqlite:///{database}")
    assert len(store.client.search_runs([store.experiment_id])) == 4


def test_a_reopened_study_run_tags_the_settings_that_changed_since_its_params_were_logged(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("method: lora\n")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracker.open_study_run("s", None, {"trials": 10, "sampler": "tpe"}, str(space))
    assert tracker.open_study_run("s", run, {"trials": 20, "sampler": "tpe", "timeout": 60}, str(space)) == run
    logged = tracker.client.get_run(run).data
    assert logged.params == {"trials": "10", "sampler": "tpe", "timeout": "60"}  # a setting it never had: a param
    assert {k: v for k, v in logged.tags.items() if k.startswith("autopeft.latest.")} == {"autopeft.latest.trials": "20"}


def test_a_run_logged_to_the_fallback_store_is_found_by_its_recorded_id_once_synced(tmp_path: Path) -> None:
    """A study records the ids its runs got in the fallback store while the server was down; after `autopeft
    sync` the server holds copies under other ids. A resumed search made a second parent run, `report` refused
    the server and `export --confirm-seeds` crashed after retraining."""
    from autopeft.sync import sync

    space = tmp_path / "space.yaml"
    space.write_text("method: lora\n")
    fallback = Tracker(f"sqlite:///{tmp_path / 'fallback.db'}")
    parent = fallback.open_study_run("s", None, {"trials": 2}, str(space))
    trial = fallback.start_trial_run(parent, "s", 0, {"r": 8})
    server = Tracker(f"sqlite:///{tmp_path / 'server.db'}")
    assert server.resolve(trial) is None
    sync(fallback.uri, server.uri)
    copy = server.resolve(trial)
    assert copy is not None and copy != trial and server.client.get_run(copy).data.params == {"r": "8"}
    assert server.open_study_run("s", parent, {"trials": 3}, str(space)) == server.resolve(parent)
    assert sync(fallback.uri, f"sqlite:///{tmp_path / 'another.db'}").copied == 2  # every target gets them once


def test_sync_completes_a_copy_whose_source_logged_on_and_a_copy_a_stopped_sync_left(tmp_path: Path) -> None:
    """A sync run while the search still logged to the fallback store left the server's copy RUNNING for ever
    ("already synced" on every later sync), and metrics logged later (export --confirm-seeds) never arrived. A
    sync stopped after creating a run left it empty and RUNNING, and the next sync made a second copy."""
    from autopeft.sync import sync
    from autopeft.tracking import SYNCED_FROM_TAG

    space = tmp_path / "space.yaml"
    space.write_text("method: lora\n")
    fallback = Tracker(f"sqlite:///{tmp_path / 'fallback.db'}")
    parent = fallback.open_study_run("s", None, {"trials": 2}, str(space))
    trial = fallback.start_trial_run(parent, "s", 0, {"r": 8})
    fallback.log_metrics(trial, {"train_loss": 0.9}, step=1)
    server = Tracker(f"sqlite:///{tmp_path / 'server.db'}")
    assert sync(fallback.uri, server.uri).copied == 2

    fallback.log_metrics(trial, {"train_loss": 0.5}, step=2)  # the search went on after the sync
    fallback.end_trial_run(trial, "COMPLETE")
    fallback.close_study_run(parent, {"completed_trials": 1})
    again = sync(fallback.uri, server.uri)
    assert (again.copied, again.completed, again.skipped) == (2, 2, 0)
    runs = server.client.search_runs([server.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    copy = server.client.get_run(server.resolve(trial))
    assert [m.value for m in server.client.get_metric_history(copy.info.run_id, "train_loss")] == [0.9, 0.5]
    assert copy.data.tags["autopeft.state"] == "COMPLETE"
    assert sync(fallback.uri, server.uri).copied == 0
    # A search resumed on the server reopens the synced parent and logs on: later syncs leave it as it is.
    study_run = server.open_study_run("s", parent, {"trials": 3}, str(space))
    server.close_study_run(study_run, {"completed_trials": 2})
    ended = server.client.get_run(study_run).info
    assert sync(fallback.uri, server.uri).copied == 0
    now = server.client.get_run(study_run)
    assert (now.info.status, now.info.end_time, now.data.metrics["completed_trials"]) == ("FINISHED", ended.end_time, 2)

    stopped = Tracker(f"sqlite:///{tmp_path / 'stopped.db'}")  # what a sync stopped after its first run leaves
    stopped.client.create_run(stopped.experiment_id, tags={SYNCED_FROM_TAG: parent})
    assert sync(fallback.uri, stopped.uri).copied == 2
    runs = stopped.client.search_runs([stopped.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    finished = stopped.client.get_run(stopped.resolve(parent))
    assert finished.data.params["trials"] == "2" and finished.data.metrics["completed_trials"] == 1
    assert sync(fallback.uri, stopped.uri).copied == 0  # complete now: not copied again
