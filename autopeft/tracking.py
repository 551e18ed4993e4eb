"""MLflow logging: one parent run per study, one nested run per trial. Uses MlflowClient with explicit
run ids (no global active run), so a resumed study re-attaches to its parent run."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from autopeft.config import absolute_sqlite_url, sqlite_file
from autopeft.errors import first_line

EXPERIMENT = "autopeft"
MOVED_TAG = "autopeft.moved_from"  # on a fallback run that replaces a run begun on the server: that run's id
SYNCED_FROM_TAG = "autopeft.synced_from"  # on a run `autopeft sync` copied (or completed): the source run's id
LATEST_TAG = "autopeft.latest."  # + a setting: its value now, where a resumed search changed it (params keep the first)
FALLBACK_URI = "sqlite:///mlflow-fallback.db"
T = TypeVar("T")
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call


def client_for(uri: str) -> MlflowClient:
    """A client of the store `uri` names from this folder. MLflow keeps one store per URL string for the life of
    the process, so a relative sqlite URL is made absolute first: used again from another folder (a notebook, the
    Python API) it would otherwise reach the first folder's file."""
    url = absolute_sqlite_url(uri)
    _forget_store_if_deleted(url)
    return MlflowClient(tracking_uri=url)


def _forget_store_if_deleted(url: str) -> None:
    """A sqlite store whose file is gone (its folder deleted between two searches of one notebook) is forgotten
    by MLflow's per-process caches of stores and engines; kept, their open connection writes to the deleted file
    and fails with "attempt to write a readonly database". The caches are MLflow's private ones: where a release
    renames them, nothing is done."""
    database = sqlite_file(url)
    if database is None or Path(database).exists():
        return
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return
    engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(url, None)
    if engine is not None:
        engine.dispose()
    registry = getattr(utils, "_tracking_store_registry", None)
    clear = getattr(getattr(registry, "_get_store_with_resolved_uri", None), "cache_clear", None)
    if clear is not None:
        clear()  # all stores (lru_cache has no per-key removal); the others are rebuilt when next used


def fail_fast(uri: str) -> None:
    """Against a tracking server: a couple of retries instead of MLflow's default minutes when it is down."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class TrackingFallbackWarning(UserWarning):
    """The tracking server was unreachable; runs went to the local fallback store (re-sync later)."""


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its files: a `mlruns` folder beside a SQLite store (MLflow's default is
    the current directory, wherever a run happens to start), the server's choice otherwise."""
    database = sqlite_file(tracking_uri)
    return None if database is None else (Path(database).expanduser().resolve().parent / "mlruns").as_uri()


@contextlib.contextmanager
def _creating_store(uri: str) -> Iterator[None]:
    """Hold a lock on a SQLite store's folder while MLflow creates its tables and our experiment. Workers that
    start together, or fall back together when a server dies, otherwise race on the same new file ("table ...
    already exists") and one of them crashes or logs elsewhere. A server serialises this itself."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    folder = Path(database).expanduser().resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


class Tracker:
    """Logs to `tracking_uri`, or, when that server does not answer (at start or at any later call), to a
    local fallback store, so the search neither stops nor loses its records; `autopeft sync` copies them
    over later. Every run's name, tags and params are remembered, so a run begun on the server is
    re-created in the fallback store when the server dies in the middle of it."""

    def __init__(self, tracking_uri: str, fallback_uri: str | None = FALLBACK_URI) -> None:
        """`fallback_uri=None`: no fallback, a store that does not answer raises (e.g. sync's target)."""
        self.uri = tracking_uri
        self.intended_uri = tracking_uri
        self.fallback_uri = fallback_uri
        self._runs: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {}  # id -> name, tags, params
        self._on_server: set[str] = set()  # ids of runs created in the intended store
        self._moved: dict[str, str] = {}  # server run id -> its replacement in the fallback store
        try:
            self._connect(tracking_uri)
        except Exception as exc:  # a down server must not end the search, however it fails
            if fallback_uri is None:
                raise
            self._fall_back(exc)

    @property
    def fell_back(self) -> bool:
        return self.uri != self.intended_uri

    def _connect(self, uri: str) -> None:
        fail_fast(uri)
        if uri.startswith(("http://", "https://")):
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).read()
        with _creating_store(uri):
            self.client = client_for(uri)
            experiment = self.client.get_experiment_by_name(EXPERIMENT)  # a new SQLite store is created here
            self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                EXPERIMENT, artifact_location=artifact_location(uri))

    def _fall_back(self, exc: BaseException) -> None:
        warnings.warn(f"MLflow tracking at {self.intended_uri} is unreachable ({first_line(exc, 200)}); "
                      f"logging to {self.fallback_uri} instead. Copy it over later with: autopeft sync "
                      f"--source {self.fallback_uri} --target {self.intended_uri}", TrackingFallbackWarning,
                      stacklevel=3)
        self.uri = self.fallback_uri
        self._connect(self.fallback_uri)

    def _server_down(self) -> bool:
        if self.fell_back or not self.uri.startswith(("http://", "https://")):
            return False
        try:
            urllib.request.urlopen(f"{self.uri.rstrip('/')}/health", timeout=5).read()
            return False
        except OSError:
            return True

    def _do(self, action: Callable[[], T]) -> T:
        """Run one client call; if the server died, switch to the fallback store and run it there."""
        try:
            return action()
        except Exception as exc:
            if self.fallback_uri is None or not self._server_down():
                raise
            self._fall_back(exc)
            return action()

    def _id(self, run_id: str) -> str:
        """The run's id in the store now in use (re-creating a server run in the fallback store)."""
        if not self.fell_back or run_id not in self._on_server:
            return run_id
        if run_id not in self._moved:
            name, tags, params = self._runs[run_id]
            self._moved[run_id] = self._create(name, {**tags, MOVED_TAG: run_id}, params)
        return self._moved[run_id]

    def _create(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
        def create() -> str:  # the parent is looked up here: it may have moved since the call began
            parent = {"mlflow.parentRunId": self._id(tags["mlflow.parentRunId"])} if "mlflow.parentRunId" in tags else {}
            run = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, **parent})
            self._log_params(run.info.run_id, params)
            return run.info.run_id

        run_id = self._do(create)
        self._remember(run_id, name, tags, params)
        return run_id

    def _remember(self, run_id: str, name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        self._runs[run_id] = (name, tags, params)
        if not self.fell_back:
            self._on_server.add(run_id)

    def open_study_run(self, study_name: str, existing_run_id: str | None, params: dict[str, Any],
                       space_file: str, space_text: str | None = None) -> str:
        """Re-open the study's parent run when this store holds it (or its synced copy), else create it. The
        caller records the id returned: a synced copy's, so later lookups find it directly."""
        existing_run_id = self.resolve(existing_run_id) if existing_run_id else None
        if existing_run_id:
            self._remember(existing_run_id, study_name, {"autopeft.study": study_name, "autopeft.role": "study"},
                           params)
            self._do(lambda: self.client.update_run(self._id(existing_run_id), status="RUNNING"))
            self._tag_changed_params(existing_run_id, params)
            return existing_run_id
        run_id = self._create(study_name, {"autopeft.study": study_name, "autopeft.role": "study"}, params)
        if space_text is not None:  # the study's own copy: a worker may not have the file
            self._do(lambda: self.client.log_text(self._id(run_id), space_text, "space/space.yaml"))
        else:
            self._do(lambda: self.client.log_artifact(self._id(run_id), space_file, artifact_path="space"))
        return run_id

    def _tag_changed_params(self, run_id: str, params: dict[str, Any]) -> None:
        """A param keeps its first value in MLflow; the settings a resumed search (or a joining worker) runs
        with that differ from it are tagged `autopeft.latest.<name>`, so the dashboard shows what runs now.
        Settings the run never had (a newer autopeft's) are logged as params."""
        logged = self._do(lambda: self.client.get_run(self._id(run_id))).data.params
        new = {k: v for k, v in params.items() if k not in logged}
        self._do(lambda: self._log_params(self._id(run_id), new))
        tags = [RunTag(f"{LATEST_TAG}{k}", str(v)[:5000]) for k, v in params.items()
                if k in logged and logged[k] != str(v)[:6000]]
        for start in range(0, len(tags), 100):
            self._do(functools.partial(self.client.log_batch, self._id(run_id), tags=tags[start:start + 100]))

    def close_study_run(self, run_id: str, metrics: dict[str, float], status: str = "FINISHED") -> None:
        self.log_metrics(run_id, metrics)
        self._do(lambda: self.client.set_terminated(self._id(run_id), status=status))

    def start_trial_run(self, parent_run_id: str, study_name: str, trial_number: int, params: dict[str, Any]) -> str:
        return self._create(f"trial-{trial_number}", {
            "mlflow.parentRunId": parent_run_id, "autopeft.study": study_name,
            "optuna.trial_number": str(trial_number), "autopeft.role": "trial"}, params)

    def start_run(self, name: str, params: dict[str, Any]) -> str:
        """A standalone run (not part of a study), e.g. `autopeft train`."""
        return self._create(name, {"autopeft.role": "train"}, params)

    def log_curve(self, run_id: str, name: str, values: list[float]) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, step) for step, v in enumerate(values, start=1)]
        for start in range(0, len(metrics), _BATCH):
            chunk = metrics[start:start + _BATCH]
            self._do(functools.partial(self.client.log_batch, self._id(run_id), metrics=chunk))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._do(lambda: self.client.log_batch(self._id(run_id), metrics=batch))

    def end_trial_run(self, run_id: str, state: str, reason: str | None = None) -> None:
        tags = [RunTag("autopeft.state", state)] + ([RunTag("autopeft.reason", reason[:5000])] if reason else [])
        status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}.get(state, "KILLED")
        self._do(lambda: self.client.log_batch(self._id(run_id), tags=tags))
        self._do(lambda: self.client.set_terminated(self._id(run_id), status=status))

    def log_file(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self._do(lambda: self.client.log_artifact(self._id(run_id), str(path), artifact_path=artifact_path))

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self._do(lambda: self.client.log_artifacts(self._id(run_id), str(folder), artifact_path=artifact_path))

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def resolve(self, run_id: str) -> str | None:
        """The id under which this store holds run `run_id`: its own, or that of the copy `autopeft sync` made
        of it (a run logged to the fallback store while the server was down, whose id the study recorded).
        None when the store holds neither."""
        if self._exists(run_id):
            return run_id
        return self._do(lambda: synced_copy(self.client, self.experiment_id, run_id))

    def _exists(self, run_id: str) -> bool:
        try:
            self._do(lambda: self.client.get_run(run_id))
            return True
        except Exception:  # noqa: BLE001 -- MlflowException for a run not in this store, or a store that is down
            return False


def synced_copy(client: MlflowClient, experiment_id: str, source_run_id: str) -> str | None:
    """The id of the run `autopeft sync` copied from `source_run_id` into the client's store, if any."""
    if not source_run_id.isalnum():  # MLflow's ids are hex; anything else is not one (nor safe in a filter)
        return None
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SYNCED_FROM_TAG}` = '{source_run_id}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None
