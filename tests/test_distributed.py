"""Scale-out on real engines: 3 workers share one study on a real PostgreSQL and log to a real MLflow
tracking server; one worker is killed mid-run and the others still finish exactly 12 trials."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.servers import free_port

AUTOPEFT = [sys.executable, "-m", "autopeft.cli"]


@pytest.mark.servers
def test_three_workers_on_postgres_and_an_mlflow_server(tmp_path: Path, tiny_search_args: list[str],
                                                        postgres_url: str, mlflow_server_url: str) -> None:
    stores = ["--storage", postgres_url, "--tracking-uri", mlflow_server_url]
    args = [a if a != "3" else "60" for a in tiny_search_args]  # --max-steps 60: trials last a few seconds
    created = subprocess.run([*AUTOPEFT, "search", "--trials", "0", "--study", "dist", "--heartbeat", "1",
                              *stores, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert created.returncode == 0, created.stderr
    workers = [subprocess.Popen([*AUTOPEFT, "worker", "--study", "dist", *stores, "--trials", "12",
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
    assert len(complete) == 12
    configs = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(configs)) == 12  # no configuration completed twice
    assert len({t.number for t in trials}) == len(trials)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server_url)
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autopeft.role") == "study" and r.data.tags.get("autopeft.study") == "dist"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
              and r.data.tags.get("autopeft.state") == "COMPLETE"]
    assert len(nested) == 12
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in nested) == sorted(t.number for t in complete)


@pytest.mark.servers
def test_a_down_tracking_server_falls_back_locally_and_sync_copies_the_runs(
        tmp_path: Path, tiny_search_args: list[str], mlflow_server_url: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    done = subprocess.run([*AUTOPEFT, "search", "--trials", "2", "--study", "fb", "--tracking-uri", down,
                           *tiny_search_args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "is unreachable" in done.stderr and "autopeft sync" in done.stderr
    assert (tmp_path / "mlflow-fallback.db").is_file()
    synced = subprocess.run([*AUTOPEFT, "sync", "--source", "sqlite:///mlflow-fallback.db", "--target",
                             mlflow_server_url], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0 and "copied 3 runs" in synced.stdout, synced.stderr
    again = subprocess.run([*AUTOPEFT, "sync", "--source", "sqlite:///mlflow-fallback.db", "--target",
                            mlflow_server_url], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "copied 0 runs" in again.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server_url)
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("autopeft.study") == "fb" and r.data.tags.get("autopeft.role") == "study")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all("val_accuracy" in r.data.metrics for r in children)
    assert len(client.get_metric_history(children[0].info.run_id, "train_loss")) == 3
    assert {a.path for a in client.list_artifacts(children[0].info.run_id)} >= {"adapter_config.json", "training.yaml"}
