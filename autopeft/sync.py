"""`autopeft sync`: copy the runs of one MLflow store (e.g. the local fallback used while the tracking
server was down) into another, keeping parent/child links, params, metric histories, tags and artifacts.
Each copy is tagged with its source run's id, so running sync again copies only what this target lacks: runs it
has no copy of, and the records an earlier copy lacks (its source logged on after that sync, or it was stopped)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from autopeft.errors import first_line
from autopeft.tracking import EXPERIMENT, MOVED_TAG, SYNCED_FROM_TAG, Tracker, client_for, fail_fast

SYNCED_STATE_TAG = "autopeft.synced_state"  # on a complete copy: `source_state` of the run it was copied from


@dataclass(frozen=True)
class SyncResult:
    copied: int  # runs written to the target: new copies, and runs it held that lacked some of the source's records
    skipped: int  # runs whose copy was already up to date
    completed: int = 0  # of `copied`, runs the target already held (an earlier copy, or a run its server began)


class SourceUnreadable(Exception):
    """The source store could not be read (as opposed to the target not taking the copies)."""


def sync(source_uri: str, target_uri: str) -> SyncResult:
    fail_fast(source_uri)
    try:  # whatever the store raises (unreachable, not a store) is the source's problem, not the target's
        source = client_for(source_uri)
        experiment = source.get_experiment_by_name(EXPERIMENT)
        runs = source.search_runs([experiment.experiment_id], max_results=50000) if experiment else []
    except Exception as exc:
        raise SourceUnreadable(first_line(exc)) from exc
    if not runs:
        return SyncResult(0, 0)
    target = Tracker(target_uri, fallback_uri=None)  # no fallback for the target itself
    # Parents first, so children can point at their copies.
    runs.sort(key=lambda r: "mlflow.parentRunId" in r.data.tags)
    copies = _copied_before(target)
    mapping: dict[str, str] = {}
    copied = completed = 0
    for run in runs:
        copy = copies.get(run.info.run_id) or _original(target, run.data.tags.get(MOVED_TAG))
        if copy is not None and _up_to_date(copy, run):
            mapping[run.info.run_id] = copy.info.run_id
            continue
        mapping[run.info.run_id] = _copy_run(source, target, run, mapping, copy)
        copied += 1
        completed += copy is not None
    return SyncResult(copied, len(runs) - copied, completed)


def _copied_before(target: Tracker) -> dict[str, Run]:
    """Source run id -> its copy, for every run an earlier sync copied into this target (or began copying: the
    tag is set first, so a sync stopped half-way is finished by the next). Read off the target's own tags, so a
    run synced into one store is still copied into another."""
    runs = target.client.search_runs([target.experiment_id], max_results=50000)
    return {r.data.tags[SYNCED_FROM_TAG]: r for r in runs if SYNCED_FROM_TAG in r.data.tags}


def _own_tags(run: Run) -> dict[str, str]:
    return {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.runName"}


def source_state(run: Run) -> str:
    """A digest of what the source run holds. Its copy is tagged with it once the copy is complete; a source that
    logged on since (its search was still running, `export --confirm-seeds` added metrics) no longer matches. It
    is compared with the source, never with the copy, which a resumed search may have logged to since."""
    held = [run.info.status, run.info.end_time, sorted(run.data.params.items()), sorted(run.data.metrics.items()),
            sorted(_own_tags(run).items())]
    return hashlib.sha256(json.dumps(held).encode()).hexdigest()[:16]


def _up_to_date(copy: Run, run: Run) -> bool:
    return copy.data.tags.get(SYNCED_STATE_TAG) == source_state(run)


def _copy_run(source: MlflowClient, target: Tracker, run: Run, mapping: dict[str, str], copy: Run | None) -> str:
    """The run's copy in the target, made or completed: a new run; or a run the target already holds (an earlier
    copy, or a run begun on the target before its server went down, re-created in the fallback store with
    `autopeft.moved_from`), given the source's records it lacks. A begun run once stayed RUNNING for ever
    beside a duplicate."""
    tags = _own_tags(run)
    parent = run.data.tags.get("mlflow.parentRunId")
    if parent:
        tags["mlflow.parentRunId"] = mapping.get(parent, parent)
    tags[SYNCED_FROM_TAG] = run.info.run_id
    if copy is not None:
        run_id, logged = copy.info.run_id, copy.data.params
        target.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()
                                              if k not in ("mlflow.runName", "mlflow.parentRunId")])
    else:
        run_id, logged = target.client.create_run(target.experiment_id, start_time=run.info.start_time,
                                                  tags=tags).info.run_id, {}
    params = [Param(k, v) for k, v in run.data.params.items() if k not in logged]  # MLflow params are write-once
    for start in range(0, len(params), 100):
        target.client.log_batch(run_id, params=params[start:start + 100])
    for key in run.data.metrics:
        have = {(m.step, m.timestamp, m.value) for m in target.client.get_metric_history(run_id, key)} if copy else set()
        history = [Metric(m.key, m.value, m.timestamp, m.step) for m in source.get_metric_history(run.info.run_id, key)
                   if (m.step, m.timestamp, m.value) not in have]
        for start in range(0, len(history), 900):
            target.client.log_batch(run_id, metrics=history[start:start + 900])
    with tempfile.TemporaryDirectory() as folder:
        if source.list_artifacts(run.info.run_id):
            local = source.download_artifacts(run.info.run_id, "", folder)
            target.client.log_artifacts(run_id, local)
    # A copy's state only moves forward: a source still RUNNING leaves it as it is (a new copy is RUNNING), and a
    # copy that has ended (a search resumed on the target closed it since) is not reopened or re-dated.
    if run.info.status != "RUNNING" and (copy is None or copy.info.status == "RUNNING"):
        target.client.set_terminated(run_id, status=run.info.status, end_time=run.info.end_time)
    target.client.set_tag(run_id, SYNCED_STATE_TAG, source_state(run))  # last: the copy is complete
    return run_id


def _original(target: Tracker, run_id: str | None) -> Run | None:
    """The target's run that a fallback run replaced, when the target holds it."""
    if not run_id:
        return None
    try:
        return target.client.get_run(run_id)
    except Exception:  # noqa: BLE001 -- MlflowException: not a run of this store (another server's, say)
        return None
