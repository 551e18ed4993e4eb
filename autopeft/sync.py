"""`autopeft sync`: copy the runs of one MLflow store (e.g. the local fallback used while the tracking
server was down) into another, keeping parent/child links, params, metric histories, tags and artifacts.
Each copy is tagged with its source run's id, so running sync again copies only what this target lacks."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from autopeft.tracking import EXPERIMENT, MOVED_TAG, SYNCED_FROM_TAG, Tracker, fail_fast


@dataclass(frozen=True)
class SyncResult:
    copied: int
    skipped: int


class SourceUnreadable(Exception):
    """The source store could not be read (as opposed to the target not taking the copies)."""


def sync(source_uri: str, target_uri: str) -> SyncResult:
    fail_fast(source_uri)
    try:  # whatever the store raises (unreachable, not a store) is the source's problem, not the target's
        source = MlflowClient(tracking_uri=source_uri)
        experiment = source.get_experiment_by_name(EXPERIMENT)
        runs = source.search_runs([experiment.experiment_id], max_results=50000) if experiment else []
    except Exception as exc:
        raise SourceUnreadable(str(exc)) from exc
    if not runs:
        return SyncResult(0, 0)
    target = Tracker(target_uri, fallback_uri=None)  # no fallback for the target itself
    # Parents first, so children can point at their copies.
    runs.sort(key=lambda r: "mlflow.parentRunId" in r.data.tags)
    mapping = _copied_before(target)
    copied = 0
    for run in runs:
        if run.info.run_id in mapping:
            continue
        mapping[run.info.run_id] = _copy_run(source, target, run, mapping)
        copied += 1
    return SyncResult(copied, len(runs) - copied)


def _copied_before(target: Tracker) -> dict[str, str]:
    """Source run id -> its copy, for every run an earlier sync copied into this target. Read off the target's
    own tags, so a run synced into one store is still copied into another."""
    runs = target.client.search_runs([target.experiment_id], max_results=50000)
    return {r.data.tags[SYNCED_FROM_TAG]: r.info.run_id for r in runs if SYNCED_FROM_TAG in r.data.tags}


def _copy_run(source: MlflowClient, target: Tracker, run: Run, mapping: dict[str, str]) -> str:
    """The run's copy in the target: a new run, or, for a run begun on the target before its server went down
    (re-created in the fallback store with `autopeft.moved_from`), that original run, completed with the rest
    of the run's records; else the original stayed RUNNING for ever beside a duplicate."""
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        tags["mlflow.parentRunId"] = mapping.get(parent, parent)
    original = _original(target, run.data.tags.get(MOVED_TAG))
    if original is not None:
        run_id, logged = original.info.run_id, original.data.params
        target.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()
                                              if k not in ("mlflow.runName", "mlflow.parentRunId")])
    else:
        run_id, logged = target.client.create_run(target.experiment_id, start_time=run.info.start_time,
                                                  tags=tags).info.run_id, {}
    params = [Param(k, v) for k, v in run.data.params.items() if k not in logged]  # MLflow params are write-once
    for start in range(0, len(params), 100):
        target.client.log_batch(run_id, params=params[start:start + 100])
    for key in run.data.metrics:
        history = [Metric(m.key, m.value, m.timestamp, m.step) for m in source.get_metric_history(run.info.run_id, key)]
        for start in range(0, len(history), 900):
            target.client.log_batch(run_id, metrics=history[start:start + 900])
    with tempfile.TemporaryDirectory() as folder:
        if source.list_artifacts(run.info.run_id):
            local = source.download_artifacts(run.info.run_id, "", folder)
            target.client.log_artifacts(run_id, local)
    target.client.log_batch(run_id, tags=[RunTag(SYNCED_FROM_TAG, run.info.run_id)])
    target.client.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)
    return run_id


def _original(target: Tracker, run_id: str | None) -> Run | None:
    """The target's run that a fallback run replaced, when the target holds it."""
    if not run_id:
        return None
    try:
        return target.client.get_run(run_id)
    except Exception:  # noqa: BLE001 -- MlflowException: not a run of this store (another server's, say)
        return None
