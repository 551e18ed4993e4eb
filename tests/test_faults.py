"""Faults a long search must survive: kill -9 mid-trial, Ctrl-C, failing trials, a broken setup."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from tests_support import AUTOPEFT

from autopeft.errors import TrialFailed


def slow_search(tmp_path: Path, tiny_search_args: list[str], trials: int) -> list[str]:
    # Enough steps that a trial is still running when the test strikes (a few seconds on the tiny model).
    args = [a if a != "3" else "150" for a in tiny_search_args]  # --max-steps 3 -> 150
    return [*AUTOPEFT, "search", "--trials", str(trials), "--study", "f", "--heartbeat", "1", *args]


def wait_for_running_trial(tmp_path: Path, after_completed: int, timeout: float = 300) -> optuna.trial.FrozenTrial:
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path / 'autopeft.db'}")
        except KeyError:
            continue
        states = [t.state for t in study.trials]
        running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        if states.count(optuna.trial.TrialState.COMPLETE) >= after_completed and running and \
                "mlflow_run_id" in running[0].user_attrs:
            return running[0]
    raise AssertionError("no running trial appeared")


def mlflow_runs(tmp_path: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])


def test_kill_9_mid_trial_then_rerun_keeps_finished_work_and_retries_the_killed_config(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    command = slow_search(tmp_path, tiny_search_args, trials=2)
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = wait_for_running_trial(tmp_path, after_completed=1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(4)  # past the heartbeat grace period (3 x 1 s)
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, check=False, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path / 'autopeft.db'}")
    by_number = {t.number: t for t in study.trials}
    assert by_number[victim.number].state == optuna.trial.TrialState.FAIL
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    runs = {r.info.run_id: r for r in mlflow_runs(tmp_path)}
    assert all(r.info.status != "RUNNING" for r in runs.values())
    assert runs[victim.user_attrs["mlflow_run_id"]].info.status == "KILLED"


def test_ctrl_c_records_the_trial_as_interrupted_and_prints_the_summary(tmp_path: Path,
                                                                        tiny_search_args: list[str]) -> None:
    process = subprocess.Popen(slow_search(tmp_path, tiny_search_args, trials=2), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = wait_for_running_trial(tmp_path, after_completed=1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert f"interrupted: trial {victim.number} recorded as failed" in err and "val acc" in out and "Traceback" not in err
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path / 'autopeft.db'}")
    trial = next(t for t in study.trials if t.number == victim.number)
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted"
    assert "steps_trained" in trial.user_attrs  # what it trained counts against --max-total-steps
    assert all(r.info.status != "RUNNING" for r in mlflow_runs(tmp_path))


@pytest.mark.parametrize(("error", "reason"), [
    (TrialFailed("non-finite loss"), "non-finite loss"),
    (RuntimeError("boom"), "RuntimeError: boom"),
    (torch.OutOfMemoryError("CUDA out of memory"), "out of memory"),
])
def test_failed_trials_are_recorded_and_consecutive_failures_stop_the_search(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, reason: str) -> None:
    from tests_support import tiny_config

    from autopeft import search

    def broken_fit(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(search, "fit", broken_fit)
    summary = search.run_search(tiny_config(tmp_path, tiny_bert, trials=5, max_consecutive_failures=2))
    failed = summary.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 2 and len(summary.study.trials) == 2
    assert all(reason in t.user_attrs["fail_reason"] for t in failed)
    assert summary.stopped_reason and "2 consecutive failed trials" in summary.stopped_reason
    if isinstance(error, RuntimeError) and not isinstance(error, torch.OutOfMemoryError):
        assert "broken_fit" in failed[0].user_attrs["traceback"]
    statuses = {r.data.tags.get("autopeft.state"): r.info.status for r in mlflow_runs(tmp_path)
                if r.data.tags.get("autopeft.role") == "trial"}
    assert statuses == {"FAIL": "FAILED"}


def test_a_worker_started_late_counts_the_failures_since_its_search_began(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`search --workers N` passes its start to its workers: one that began after another worker's failures
    counted from its own start and ran a fresh row of them past --max-consecutive-failures."""
    import datetime

    from tests_support import tiny_config

    from autopeft import search

    def broken_fit(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(search, "fit", broken_fit)
    began = datetime.datetime.now()
    config = tiny_config(tmp_path, tiny_bert, trials=5, max_consecutive_failures=3)
    search.run_search(dataclasses.replace(config, max_consecutive_failures=2))  # an earlier worker's two failures
    summary = search.run_worker(config, run_began=began)
    assert len(summary.study.get_trials(states=(optuna.trial.TrialState.FAIL,))) == 3
    assert summary.stopped_reason and "3 consecutive failed trials" in summary.stopped_reason


def test_passwords_in_urls_are_never_written_out(tmp_path: Path) -> None:
    from autopeft.config import SearchConfig

    config = SearchConfig(storage="postgresql://bob:hunter2@db/x", tracking_uri="http://u:pw@mlflow:5000")
    assert "hunter2" not in str(config.public_dict()) and "pw@" not in str(config.public_dict())


def test_a_waiting_worker_outlasts_a_trial_whose_worker_dies_late(tmp_path: Path) -> None:
    """The last trial's place is held by another worker that is alive when this worker starts waiting and dies
    later. This worker must wait until that trial turns stale, fail it and run the trial itself; with a fixed
    wait it gave up first and the study ended a trial short."""
    import threading
    from types import SimpleNamespace

    from autopeft.search import Objective

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(storage=storage)
    other = study.ask()  # the other worker's trial, ahead of ours
    other.set_user_attr("worker", "elsewhere:1")  # its objective began, as a live worker's does
    dies = threading.Event()

    def beat_then_die() -> None:  # alive for 4 s (past the old 4-heartbeat wait), then killed
        while not dies.wait(0.5):
            storage.record_heartbeat(other._trial_id)

    threading.Thread(target=beat_then_die, daemon=True).start()
    threading.Timer(4.0, dies.set).start()
    ours = study.ask()
    objective = Objective(SimpleNamespace(config=SimpleNamespace(trials=1, heartbeat_seconds=1, max_total_steps=None)),
                          None, "")
    began = time.monotonic()
    assert objective._unneeded(ours) is None
    assert time.monotonic() - began >= 4.0
    assert study.trials[other.number].state == optuna.trial.TrialState.FAIL


def test_ctrl_c_while_a_trial_waits_for_its_place_records_it_as_interrupted(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`search --workers 2 --trials 1`: the second worker's trial waits while the first runs. A Ctrl-C then
    failed it with no reason, and the summary's "interrupted:" line named only the running trial."""
    from types import SimpleNamespace

    from autopeft import interrupt
    from autopeft import study as studies
    from autopeft.search import Objective

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'wait.db'}")
    study.ask().set_user_attr("worker", "elsewhere:1")  # the running trial that holds the study's one place
    ours = study.ask()
    objective = Objective(SimpleNamespace(config=SimpleNamespace(trials=1, heartbeat_seconds=30, max_total_steps=None)),
                          None, "")

    def ctrl_c(*args: object) -> bool:  # the Ctrl-C lands in the wait: the signal handler sets the flag and raises
        interrupt.REQUESTED.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(studies, "may_start", ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            objective._wait_for_a_place(ours)
    finally:
        interrupt.REQUESTED.clear()
    assert study.trials[ours.number].user_attrs["fail_reason"] == "interrupted"


def test_a_dead_workers_configuration_queued_while_a_trial_waits_runs_in_that_trials_place(tmp_path: Path) -> None:
    """The trial that waited for the dead worker's place was already created when the configuration was queued
    again: it ran a fresh draw in its place, and the retry was left waiting for ever (the configuration lost)."""
    from types import SimpleNamespace

    from autopeft.search import Objective
    from autopeft.study import StaleTrialRetry

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=2,
                                         heartbeat_stale_trial_callback=StaleTrialRetry())
    study = optuna.create_study(storage=storage, direction="maximize")
    dead = study.ask()
    dead.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    dead.set_user_attr("worker", "elsewhere:1")
    storage.record_heartbeat(dead._trial_id)  # one heartbeat, then its worker is killed
    ours = study.ask()
    objective = Objective(SimpleNamespace(config=SimpleNamespace(trials=1, heartbeat_seconds=1, max_total_steps=None)),
                          None, "")
    with pytest.raises(optuna.TrialPruned, match="a dead worker's configuration runs again in its place"):
        objective(ours)
    study.tell(ours, state=optuna.trial.TrialState.PRUNED)  # as study.optimize records it
    retry = study.ask()  # the worker's next trial
    assert retry.user_attrs["retry_of"] == dead.number
    assert retry.suggest_float("learning_rate", 1e-4, 1e-2, log=True) == dead.params["learning_rate"]
    study.enqueue_trial(dead.params, user_attrs={"retry_of": 99})  # another dead worker's, queued meanwhile
    with pytest.raises(AttributeError):  # past the check: the stand-in runtime has no space to draw from
        objective(retry)  # a retry is never given up for another retry (its configuration would be lost)


def test_a_trial_a_late_worker_starts_after_the_study_is_complete_is_pruned_with_its_reason(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from autopeft.search import Objective

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'done.db'}")
    done = study.ask()
    study.tell(done, 0.8)  # another worker completed the study's one trial
    objective = Objective(SimpleNamespace(config=SimpleNamespace(trials=1, heartbeat_seconds=1, max_total_steps=None)),
                          None, "")
    study.optimize(objective, n_trials=1)
    late = study.trials[-1]
    assert late.state == optuna.trial.TrialState.PRUNED
    assert late.user_attrs["prune_reason"] == "not needed: other workers' trials, done or running, complete the study"


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_not_waited_on(tmp_path: Path) -> None:
    """Killed between creating a trial and starting its objective, a worker leaves a RUNNING trial with no
    heartbeat, which never turns stale: the workers waiting for the study's last places waited for ever."""
    from autopeft.study import fail_unstarted_trials

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(storage=storage)
    orphan = study.ask()  # created; its worker died before the objective began
    live = study.ask()
    live.set_user_attr("worker", "host:123")  # its objective began: heartbeats cover it
    assert fail_unstarted_trials(study, grace_seconds=60) == []  # too recent to tell from a slow start
    assert fail_unstarted_trials(study, grace_seconds=0) == [orphan.number]
    trials = study.get_trials()
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert trials[orphan.number].user_attrs["fail_reason"] == "its worker stopped before the trial began"
    assert trials[live.number].state == optuna.trial.TrialState.RUNNING
    assert fail_unstarted_trials(study, grace_seconds=0) == []


def test_steps_a_failed_trial_trained_count_against_the_step_budget(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests_support import tiny_config

    from autopeft import search

    def fit_that_diverges_at_step_3(model: object, *args: object, on_step, **kwargs: object) -> None:
        for step in (1, 2):
            on_step(step, model)
        raise TrialFailed("non-finite loss")

    monkeypatch.setattr(search, "fit", fit_that_diverges_at_step_3)
    summary = search.run_search(tiny_config(tmp_path, tiny_bert, trials=5, max_total_steps=6,
                                            max_consecutive_failures=10))
    assert [t.user_attrs["steps_trained"] for t in summary.study.trials] == [2, 2]  # a third could need 3 more
    assert summary.stopped_reason and "4 of 6 steps spent (too few left for another 3-step trial)" in summary.stopped_reason


def test_a_failed_trials_reason_is_one_line_whatever_the_exception_says() -> None:
    """The reason recorded on a failed trial: no dangling "ValueError: " for an empty message, and an exception
    whose own __str__ fails is still a reason (it ended the whole search with a traceback instead)."""
    from autopeft.search import failure

    class Unprintable(RuntimeError):
        def __str__(self) -> str:
            raise TypeError("no")

    assert failure(ValueError()) == "ValueError"
    assert failure(ValueError("\n  bad shape\n  details")) == "ValueError: bad shape"
    assert failure(Unprintable()) == "Unprintable"


def test_a_trial_whose_adapter_cannot_be_saved_fails_with_its_reason_and_the_search_goes_on(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while a trained trial was saved ended the whole search with a traceback, the trial failed with
    no reason, and its MLflow run and the study's stayed RUNNING."""
    import errno

    from tests_support import tiny_config

    from autopeft import search

    saved = search.adapter_io.save
    calls = []

    def full_disk_once(model: torch.nn.Module, folder: Path) -> None:
        calls.append(folder)
        if len(calls) == 2:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved(model, folder)

    monkeypatch.setattr(search.adapter_io, "save", full_disk_once)
    summary = search.run_search(tiny_config(tmp_path, tiny_bert, trials=2))
    states = [t.state.name for t in summary.study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    failed = summary.study.trials[1]
    assert failed.user_attrs["fail_reason"] == "saving the trained trial failed: OSError: [Errno 28] No space left on device"
    assert failed.user_attrs["steps_trained"] == 3 and not calls[1].exists()  # no half adapter left to load
    assert {r.info.run_name: r.info.status for r in mlflow_runs(tmp_path)} == {
        "t": "FINISHED", "trial-0": "FINISHED", "trial-1": "FAILED", "trial-2": "FINISHED"}


@pytest.mark.parametrize("where", ["logging a trained trial", "scoring the base model"])
def test_ctrl_c_outside_training_leaves_no_run_running(tmp_path: Path, tiny_bert: Path,
                                                       monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Only training was guarded: a Ctrl-C while a trained trial was logged left its run RUNNING and the trial
    failed with no reason; one while the base model was scored left the study's run RUNNING, and a resume
    opened a second one beside it."""
    from tests_support import tiny_config

    from autopeft import interrupt, search
    from autopeft.tracking import Tracker

    def ctrl_c(*args: object, **kwargs: object) -> None:
        interrupt.REQUESTED.set()
        raise KeyboardInterrupt

    if where == "logging a trained trial":
        monkeypatch.setattr(Tracker, "log_curve", ctrl_c)
    else:
        monkeypatch.setattr(search, "_record_base_scores", ctrl_c)
    config = tiny_config(tmp_path, tiny_bert, trials=1)
    try:
        with pytest.raises(KeyboardInterrupt):
            search.run_search(config)
    finally:
        interrupt.REQUESTED.clear()
    assert {r.info.status for r in mlflow_runs(tmp_path)} <= {"KILLED", "FAILED"}
    study = optuna.load_study(study_name="t", storage=config.storage)
    if where == "logging a trained trial":
        assert study.trials[0].user_attrs["fail_reason"] == "interrupted"
        assert study.trials[0].user_attrs["steps_trained"] == 3
        return
    monkeypatch.undo()
    search.run_search(config)
    assert [(r.info.run_name, r.info.status) for r in mlflow_runs(tmp_path) if r.info.run_name == "t"] == [("t", "FINISHED")]


def test_a_store_that_fails_while_the_search_closes_its_run_does_not_hide_why_it_stopped(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests_support import tiny_config

    from autopeft import search
    from autopeft.tracking import Tracker

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    def locked(*args: object, **kwargs: object) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(search, "_record_base_scores", full_disk)
    monkeypatch.setattr(Tracker, "close_study_run", locked)
    with pytest.raises(OSError, match="No space left on device"):
        search.run_search(tiny_config(tmp_path, tiny_bert, trials=1))
