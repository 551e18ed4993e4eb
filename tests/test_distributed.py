"""Scale-out on real engines: 3 workers share one study on a real PostgreSQL and log to a real MLflow
tracking server; one worker is killed mid-run and the others still finish exactly 6 trials."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from tests_support import AUTOPEFT, autopeft_here

from tests.servers import free_port


@pytest.mark.servers
def test_three_workers_on_postgres_and_an_mlflow_server(tmp_path: Path, tiny_search_args: list[str],
                                                        postgres_url: str, mlflow_server_url: str) -> None:
    stores = ["--storage", postgres_url, "--tracking-uri", mlflow_server_url]
    args = [a if a != "3" else "60" for a in tiny_search_args]  # --max-steps 60: trials last a few seconds
    created = autopeft_here("search", "--trials", "0", "--study", "dist", "--heartbeat", "1", *stores, *args, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    workers = [subprocess.Popen([*AUTOPEFT, "worker", "--study", "dist", *stores, "--trials", "6",
                                 "--worker-id", str(i), "--artifacts-dir", f"a{i}"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(3)]
    study = optuna.load_study(study_name="dist", storage=postgres_url)
    deadline = time.time() + 300
    while time.time() < deadline and sum(t.state.name == "COMPLETE" for t in study.get_trials()) < 3:
        time.sleep(0.5)
    workers[0].send_signal(signal.SIGKILL)  # one worker lost mid-run
    for worker in workers[1:]:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err

    trials = study.get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6
    configs = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(configs)) == 6  # no configuration completed twice
    assert len({t.number for t in trials}) == len(trials)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server_url)
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autopeft.role") == "study" and r.data.tags.get("autopeft.study") == "dist"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
              and r.data.tags.get("autopeft.state") == "COMPLETE"]
    assert len(nested) == 6
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in nested) == sorted(t.number for t in complete)


@pytest.mark.servers
def test_a_down_tracking_server_falls_back_locally_and_sync_copies_the_runs(
        tmp_path: Path, tiny_search_args: list[str], mlflow_server_url: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    done = subprocess.run([*AUTOPEFT, "search", "--trials", "2", "--study", "fb", "--tracking-uri", down,
                           *tiny_search_args], cwd=tmp_path, capture_output=True, check=False, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "is unreachable" in done.stderr and "autopeft sync" in done.stderr
    assert (tmp_path / "mlflow-fallback.db").is_file()
    synced = autopeft_here("sync", "--source", "sqlite:///mlflow-fallback.db", "--target",
                           mlflow_server_url, cwd=tmp_path)
    assert synced.returncode == 0 and "copied 3 runs" in synced.stdout, synced.stderr
    again = autopeft_here("sync", "--source", "sqlite:///mlflow-fallback.db", "--target",
                          mlflow_server_url, cwd=tmp_path)
    assert "copied 0 runs" in again.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server_url)
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("autopeft.study") == "fb" and r.data.tags.get("autopeft.role") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all("val_accuracy" in r.data.metrics for r in children)
    assert len(client.get_metric_history(children[0].info.run_id, "train_loss")) == 3
    assert {a.path for a in client.list_artifacts(children[0].info.run_id)} >= {"adapter_config.json", "training.yaml"}

    # The study recorded the fallback store's run ids: what reads them finds the synced copies.
    report = autopeft_here("report", "--study", "fb", "--out", "rep", "--tracking-uri", mlflow_server_url, cwd=tmp_path)
    assert report.returncode == 0 and f"logged to MLflow run {parent.info.run_id}" in report.stdout, report.stderr
    resumed = subprocess.run([*AUTOPEFT, "search", "--trials", "3", "--study", "fb", "--tracking-uri", mlflow_server_url,
                              *tiny_search_args], cwd=tmp_path, capture_output=True, check=False, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autopeft.study") == "fb" and r.data.tags.get("autopeft.role") == "study"]
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # one parent run per study, not a second
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 3
    # Runs synced into one store are still copied into another; a target that is down is one line, no fallback.
    elsewhere = autopeft_here("sync", "--source", "sqlite:///mlflow-fallback.db", "--target",
                              "sqlite:///second.db", cwd=tmp_path)
    assert elsewhere.returncode == 0 and "copied 3 runs" in elsewhere.stdout, elsewhere.stderr
    unreachable = subprocess.run([*AUTOPEFT, "sync", "--source", "sqlite:///mlflow-fallback.db", "--target", down],
                                 cwd=tmp_path, capture_output=True, check=False, text=True, timeout=300)
    # A process of its own: its stderr holds every warning too, which the one line asserted here must exclude.
    assert unreachable.returncode == 2 and len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    assert f"--target: cannot sync into {down}" in unreachable.stderr


@pytest.mark.servers
def test_a_tracking_server_dying_mid_search_loses_nothing(tmp_path: Path, tiny_bert: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from autopeft.search import run_search
    from autopeft.tracking import TrackingFallbackWarning
    from tests.servers import running_mlflow_server, stop_group
    from tests.tests_support import tiny_config

    monkeypatch.chdir(tmp_path)  # the fallback store is created in the working directory
    server_root = tmp_path / "server"
    server_root.mkdir()
    with running_mlflow_server(server_root) as (url, proc):
        def kill_after_first_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            stop_group(proc)  # the server dies between trial 0 and trial 1

        config = tiny_config(tmp_path, tiny_bert, tracking_uri=url, trials=3)
        with pytest.warns(TrackingFallbackWarning, match="autopeft sync"):
            summary = run_search(config, progress=kill_after_first_trial)
    assert sum(t.state.name == "COMPLETE" for t in summary.study.trials) == 3

    on_server = MlflowClient(tracking_uri=f"sqlite:///{server_root / 'mlflow.db'}")
    server_trials = [r for r in on_server.search_runs([on_server.get_experiment_by_name("autopeft").experiment_id])
                     if r.data.tags.get("autopeft.role") == "trial"]
    assert [r.data.tags["optuna.trial_number"] for r in server_trials] == ["0"]
    fallback = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow-fallback.db'}")
    runs = fallback.search_runs([fallback.get_experiment_by_name("autopeft").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("autopeft.role") == "study")
    assert parent.data.tags["autopeft.moved_from"] == summary.parent_run_id  # the study run, re-created
    assert parent.data.params["study"] == "t"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["1", "2"]
    assert all("val_accuracy" in r.data.metrics and r.data.tags["autopeft.state"] == "COMPLETE" for r in children)

    # Back up: sync completes the runs the server began (the study run and trial 0 stayed RUNNING there beside
    # duplicates) and copies the others under that same study run.
    from autopeft.sync import sync

    with running_mlflow_server(server_root) as (url, _):
        assert sync("sqlite:///mlflow-fallback.db", url).copied == 3
    runs = on_server.search_runs([on_server.get_experiment_by_name("autopeft").experiment_id])
    assert sorted(r.data.tags["autopeft.role"] for r in runs) == ["study", "trial", "trial", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    study_run = next(r for r in runs if r.data.tags["autopeft.role"] == "study")
    assert study_run.info.run_id == summary.parent_run_id and study_run.data.metrics["completed_trials"] == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags["autopeft.role"] == "trial"} == {
        summary.parent_run_id}
