"""MLflow logging: one parent run per study, one nested run per trial. Uses MlflowClient with explicit
run ids (no global active run), so a resumed study re-attaches to its parent run."""

from __future__ import annotations

import os
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

EXPERIMENT = "autopeft"
FALLBACK_URI = "sqlite:///mlflow-fallback.db"
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


class TrackingFallbackWarning(UserWarning):
    """The tracking server was unreachable; runs went to the local fallback store (re-sync later)."""


class Tracker:
    """Logs to `tracking_uri`, or, when that server does not answer, to a local fallback store so the
    search neither stops nor loses its records; `autopeft sync` copies them over later."""

    def __init__(self, tracking_uri: str, fallback_uri: str = FALLBACK_URI) -> None:
        self.uri = tracking_uri
        self.intended_uri = tracking_uri
        try:
            self._connect(tracking_uri)
        except Exception as exc:  # a down server must not end the search
            warnings.warn(f"MLflow tracking at {tracking_uri} is unreachable ({str(exc).splitlines()[0][:200]}); "
                          f"logging to {fallback_uri} instead. Copy it over later with: autopeft sync "
                          f"--source {fallback_uri} --target {tracking_uri}", TrackingFallbackWarning, stacklevel=2)
            self.uri = fallback_uri
            self._connect(fallback_uri)

    @property
    def fell_back(self) -> bool:
        return self.uri != self.intended_uri

    def _connect(self, uri: str) -> None:
        if uri.startswith(("http://", "https://")):
            # Fail fast instead of MLflow's default minutes of retries when the server is down.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).read()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)

    def open_study_run(self, study_name: str, existing_run_id: str | None, params: dict[str, Any],
                       space_file: str, space_text: str | None = None) -> str:
        """Re-open the study's parent run when it exists in this store, else create it."""
        if existing_run_id and self._exists(existing_run_id):
            self.client.update_run(existing_run_id, status="RUNNING")
            return existing_run_id
        run = self.client.create_run(self.experiment_id, run_name=study_name,
                                     tags={"autopeft.study": study_name, "autopeft.role": "study"})
        self._log_params(run.info.run_id, params)
        if space_text is not None:  # the study's own copy: a worker may not have the file
            self.client.log_text(run.info.run_id, space_text, "space/space.yaml")
        else:
            self.client.log_artifact(run.info.run_id, space_file, artifact_path="space")
        return run.info.run_id

    def close_study_run(self, run_id: str, metrics: dict[str, float], status: str = "FINISHED") -> None:
        self.log_metrics(run_id, metrics)
        self.client.set_terminated(run_id, status=status)

    def start_trial_run(self, parent_run_id: str, study_name: str, trial_number: int, params: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_number}", tags={
            "mlflow.parentRunId": parent_run_id, "autopeft.study": study_name,
            "optuna.trial_number": str(trial_number), "autopeft.role": "trial"})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def start_run(self, name: str, params: dict[str, Any]) -> str:
        """A standalone run (not part of a study), e.g. `autopeft train`."""
        run = self.client.create_run(self.experiment_id, run_name=name, tags={"autopeft.role": "train"})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_curve(self, run_id: str, name: str, values: list[float]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, step) for step, v in enumerate(values, start=1)]
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + _BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def end_trial_run(self, run_id: str, state: str, reason: str | None = None) -> None:
        tags = [RunTag("autopeft.state", state)] + ([RunTag("autopeft.reason", reason[:5000])] if reason else [])
        self.client.log_batch(run_id, tags=tags)
        status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")
        self.client.set_terminated(run_id, status=status)

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path=artifact_path)

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # MlflowException for a run that is not in this store
            return False
