"""Prove that the server fixtures in tests/servers.py are real servers, not stand-ins."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.servers


def test_postgres_is_real_and_persists_optuna_trials(postgres_url: str) -> None:
    import optuna
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as connection:
        version = connection.execute(sqlalchemy.text("SELECT version()")).scalar_one()
    engine.dispose()
    assert "PostgreSQL" in version

    name = f"servers-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=postgres_url, study_name=name)
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5},
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                                              value=1.25))
    # A second load goes back to the database, so this reads what the server stored.
    reloaded = optuna.load_study(storage=postgres_url, study_name=name)
    assert [(t.params, t.value) for t in reloaded.trials] == [({"x": 0.5}, 1.25)]


def test_mlflow_server_is_real(mlflow_server_url: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server_url)
    experiment_id = client.create_experiment(f"servers-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.001")
    client.log_metric(run.info.run_id, "accuracy", 0.75)

    fetched = client.get_run(run.info.run_id)
    assert fetched.info.experiment_id == experiment_id
    assert fetched.data.params == {"lr": "0.001"}
    assert fetched.data.metrics == {"accuracy": 0.75}
