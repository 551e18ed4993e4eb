"""Confirmation: the rule's leading candidates retrained with new seeds; the export follows the means."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest

import autopeft.search
from autopeft.confirm import confirm, extra_seeds
from autopeft.errors import TrialFailed
from autopeft.export import _leader, accuracy_first, candidates


def study_of(recorded: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, accuracy in enumerate(recorded):
        trial = study.ask()
        trial.set_user_attr("params", {"method": "lora", "lora.r": 8})
        trial.set_user_attr("seed", number)
        study.tell(trial, (accuracy, 0.01))
    return study


class FakeTraining:
    """Stands in for run_trial: each trial seed's configuration has its own accuracy on every new seed."""

    def __init__(self, by_trial: dict[int, float | str]) -> None:
        self.by_trial = by_trial
        self.calls: list[int] = []

    def __call__(self, runtime: object, params: object, *, seed: int) -> SimpleNamespace:
        self.calls.append(seed)
        value = self.by_trial[seed % extra_seeds(0, 1)[0]]  # back to the trial's own seed
        if isinstance(value, str):
            raise TrialFailed(value)
        return SimpleNamespace(accuracy=value, forgetting=0.02)


def test_the_export_follows_the_means_not_the_luckiest_run(monkeypatch: pytest.MonkeyPatch) -> None:
    study = study_of([0.80, 0.78, 0.60])  # trial 0's run was lucky: its configuration gives 0.70
    fake = FakeTraining({0: 0.70, 1: 0.79, 2: 0.60})
    monkeypatch.setattr(autopeft.search, "run_trial", fake)
    ranked = candidates(study, "max-accuracy-under-forgetting=1")
    assert [t.number for t in ranked.trials[:2]] == [0, 1]
    confirmed = [confirm(study, t, runtime=None, count=2) for t in ranked.trials[:2]]  # type: ignore[arg-type]
    assert confirmed[0].accuracy == pytest.approx((0.80 + 0.70 + 0.70) / 3)
    assert confirmed[1].accuracy == pytest.approx((0.78 + 0.79 + 0.79) / 3)
    assert _leader(confirmed, ranked.order).trial_number == 1
    assert len(fake.calls) == 4 and 2 not in {s % extra_seeds(0, 1)[0] for s in fake.calls}


def test_runs_kept_in_the_study_are_not_trained_again(monkeypatch: pytest.MonkeyPatch) -> None:
    study = study_of([0.80])
    fake = FakeTraining({0: 0.70})
    monkeypatch.setattr(autopeft.search, "run_trial", fake)
    first = confirm(study, study.trials[0], runtime=None, count=2)  # type: ignore[arg-type]
    again = confirm(study, study.trials[0], runtime=None, count=3)  # type: ignore[arg-type]
    assert len(fake.calls) == 3  # two, then only the third seed
    assert again.runs[:3] == first.runs and len(again.runs) == 4


def test_a_configuration_that_fails_on_a_seed_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    study = study_of([0.80, 0.75])
    monkeypatch.setattr(autopeft.search, "run_trial", FakeTraining({0: "loss became NaN at step 12", 1: 0.74}))
    confirmed = [confirm(study, t, runtime=None, count=1) for t in study.trials]  # type: ignore[arg-type]
    assert confirmed[0].failures == (f"seed {extra_seeds(0, 1)[0]}: loss became NaN at step 12",)
    assert _leader(confirmed, accuracy_first).trial_number == 1


def test_confirmation_runs_are_logged_to_a_store_that_exists(tmp_path) -> None:
    """The recorded store moved: MLflow created an empty one (and its folder) at the old path, and the
    confirmation's metrics were logged nowhere, exit 0. A store written without its password is asked for."""
    from autopeft.errors import ConfigError
    from autopeft.export import confirmation_store

    moved = SimpleNamespace(user_attrs={"config": {"tracking_uri": f"sqlite:///{tmp_path}/gone/mlflow.db"}})
    with pytest.raises(ConfigError, match=r"no MLflow store at .*gone/mlflow.db \(where the search logged; pass"):
        confirmation_store(moved, None)
    assert not (tmp_path / "gone").exists()
    redacted = SimpleNamespace(user_attrs={"config": {"tracking_uri": "http://me:***@127.0.0.1:5000"}})
    with pytest.raises(ConfigError, match="without its password"):
        confirmation_store(redacted, None)
    assert confirmation_store(redacted, "http://me:pw@127.0.0.1:5000") == "http://me:pw@127.0.0.1:5000"
