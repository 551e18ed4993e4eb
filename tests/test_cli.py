"""End to end through the `autopeft` command: search -> export -> peft loads it -> MLflow holds the runs;
bad input -> one line, exit 2, nothing written; `autopeft ui` serves on 127.0.0.1 and stops on Ctrl-C.
Each command runs as its own process, except the tables of refusals, which run the same command in the test's
process (`autopeft_here`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from tests_support import AUTOPEFT, autopeft, autopeft_here

from autopeft.config import format_bytes
from tests.servers import free_port


def test_search_export_and_mlflow_records(tmp_path: Path, tiny_search_args: list[str]) -> None:
    done = autopeft("search", "--trials", "2", "--study", "e2e", *tiny_search_args, "--max-length", "24", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for expected in ("val acc", "forgetting", "trainable", "chosen (balanced rule): trial",
                     "how far it leads: val accuracy",
                     str(tmp_path / "autopeft.db"), str(tmp_path / "mlflow.db"), "autopeft ui --tracking-uri"):
        assert expected in done.stdout

    exported = autopeft("export", "--study", "e2e", "--out", "out", "--with-weights", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(tmp_path / "out"))
    modes = {p.name: p.stat().st_mode for p in (tmp_path / "out").iterdir()}  # the weights were 600, the rest 644
    assert modes["adapter_model.safetensors"] == modes["metrics.json"] == modes["adapter_config.json"]
    assert config.peft_type in ("LORA", "IA3")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "most accurate Pareto trial" in metrics["chosen_by"]
    # Three steps on a tiny model may learn nothing; whichever happened, search and export say the same.
    majority = optuna.load_study(study_name="e2e", storage=f"sqlite:///{tmp_path / 'autopeft.db'}").user_attrs[
        "split"]["validation_majority"]
    learned_nothing = metrics["val_accuracy"] <= majority
    assert (metrics["warning"] is not None) == learned_nothing
    card = (tmp_path / "out" / "README.md").read_text()
    assert metrics["label_names"] == ["fresh", "rotten"]  # which head output is which class
    assert "| labels (head output index: label) | 0: 'fresh', 1: 'rotten' |" in card and "num_labels=2" in card
    assert "| forgetting (the linear_probe probe's) |" in card and metrics["forgetting_probe"] == "linear_probe"
    seq_len = metrics["memory_estimate_seq_len"]
    assert f"tokens (traced; `autopeft estimate --config training.yaml --seq-len {seq_len}` traces it again" in card
    # The card's figure is the one that command prints (it once showed the search's analytic estimate, 10% off).
    again = autopeft("estimate", "--config", "out/training.yaml", "--seq-len", str(seq_len), cwd=tmp_path)
    total = next(line for line in again.stdout.splitlines() if line.startswith("total"))
    assert f"| {format_bytes(metrics['memory_estimate_bytes'])} on cpu at the longest training row" in card
    assert total.split()[1:3] == format_bytes(metrics["memory_estimate_bytes"]).split()
    for text in (done.stdout, exported.stdout, card):
        assert ("no better than the majority class" in text) == learned_nothing
    import yaml

    training = yaml.safe_load((tmp_path / "out" / "training.yaml").read_text())
    for key in ("model", "task", "optimizer", "learning_rate", "precision", "grad_accum_steps",
                "micro_batch_size", "max_steps", "seed"):
        assert key in training
    assert training["max_length"] == 24 and seq_len == 24  # rotten tomatoes has rows longer than 24 tokens

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autopeft")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("autopeft.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    logged = parents[0].data.params  # the split as made beside the sizes asked for, never over them
    assert logged["val_size"] == "60" and logged["split.validation_size"] == "60" and "validation_size" not in logged
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"val_accuracy", "forgetting", "trainable_params", "trainable_fraction", "wall_seconds",
                "seconds_per_step", "memory_estimate_bytes", "val_accuracy_intermediate"} <= set(run.data.metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"adapter_config.json", "training.yaml"}
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3  # one point per step
        assert "method" in run.data.params and "learning_rate" in run.data.params
        assert run.data.tags["autopeft.state"] == "COMPLETE" and "optuna.trial_number" in run.data.tags


BAD_INPUTS = [
    (["--memory-budget", "-3GiB"], "--memory-budget"),
    (["--memory-budget", "lots"], "--memory-budget"),
    (["--model", "./no/such/model"], "--model: ./no/such/model does not exist"),
    (["--task", "missing.csv"], "--task: missing.csv does not exist"),
    (["--space", "bad.yaml"], "bad.yaml: methods.lora.r: 0 must be >= 1"),
    (["--trials", "-1"], "--trials: -1 must be at least 0"),
    (["--forgetting-weight", "0.5"], "--forgetting-weight: 0.5 needs --objective-mode scalar"),
    (["--space", "broken.yaml"], "broken.yaml: not valid YAML at line"),
    (["--space", "latin.yaml"], "latin.yaml: not UTF-8 text"),
    (["--artifacts-dir", "/proc/autopeft"], "--artifacts-dir: cannot create /proc/autopeft/default"),
    (["--text-column", "label"], "--text-column 'label', --label-column 'label': each must name a different column"),
    (["--task-type", "causal_lm", "--template", "Review: {text} }"], "is not a valid template (Single '}' encountered"),
    # A shell passes \n as two characters; the template reads it as a newline (repr shows it as \n, not \\n).
    (["--task-type", "causal_lm", "--template", r"Review:\n{text!r}"], r"--template: 'Review:\n{text!r}' may hold plain"),
    (["--space", "unknown.yaml"], "unknown.yaml: method: 'dreambooth' must be one of"),
    (["--memory-budget", "1MiB"], "fits no configuration of"),
    (["--task", "task.csv"], "task.csv has no column 'label'"),
    (["--seed", "-1"], "--seed: -1 must be between 0 and 2**32 - 1"),
    (["--tracking-uri", "mlflow.db"], "--tracking-uri: 'mlflow.db' is not a store MLflow logs to"),
    # MLflow could never create it: the whole search logged to the fallback store, and the study recorded this URL.
    (["--tracking-uri", "sqlite:///task.csv/runs.db"], "--tracking-uri: task.csv/runs.db cannot be created: "),
    # The tiny BERT has 128 positions; the first forward pass once failed with a size mismatch.
    (["--task", "long.csv", "--max-length", "200"], "--max-length: 200 lets rows reach 200 tokens, but"),
    # [CLS] [SEP] alone: the model saw no text, and at 1 the tokenizer did not truncate at all.
    (["--max-length", "2"], "--max-length: 2 leaves no room for a text: the tokenizer adds 2 special tokens"),
    (["--task-type", "causal_lm", "--label-words", "good,"], "--label-words: 'good,' has an empty entry (entry 2)"),
    (["--workers", "0"], "--workers: 0 must be at least 1"),
    (["--workers", "2", "--trials", "-1"], "--trials: -1 must be at least 0"),  # once it loaded, wrote and exited 0
    (["--workers", "2", "--trials", "0"], "--trials 0 with --workers 2: the workers need a target"),
    (["--task", "packaged:rotten_tomatoes", "--text-column", "review"], "--text-column: 'review' does not apply"),
    (["--storage", "postgresql+psycopg2://nobody:secret@127.0.0.1:9/none"], "--storage: cannot open postgresql+psycopg2://nobody:***@127.0.0.1:9/none"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, args: list[str], message: str,
                                                         tiny_search_args: list[str]) -> None:
    (tmp_path / "bad.yaml").write_text("method: lora\nmethods:\n  lora:\n    r: [0, 4]\n")
    (tmp_path / "task.csv").write_text("text,stars\ngood,1\nbad,0\n")
    (tmp_path / "broken.yaml").write_text("method: [lora\n")
    (tmp_path / "latin.yaml").write_bytes("method: lora  # réglage\n".encode("latin-1"))
    (tmp_path / "unknown.yaml").write_text("method: dreambooth\n")
    (tmp_path / "long.csv").write_text("text,label\n" + "".join(f"{'word ' * 300}{i},{i % 2}\n" for i in range(40)))
    before = set(os.listdir(tmp_path))
    done = autopeft_here("search", *tiny_search_args, *args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr and "secret" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert set(os.listdir(tmp_path)) == before


def test_a_pruned_trial_in_a_scalar_study_prints_its_reason_not_scores() -> None:
    """Optuna keeps a pruned trial's last mid-training value as its value: one number, no forgetting."""
    import optuna
    from rich.console import Console

    from autopeft.cli import _trial_line, trials_table

    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("params", {"method": "lora", "lora.r": 8, "learning_rate": 1e-3})
    trial.set_user_attr("prune_reason", "pruned by hyperband at step 30")
    trial.report(0.61, 30)
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    pruned = study.trials[0]
    assert pruned.values == [0.61]
    assert _trial_line(pruned).endswith("pruned by hyperband at step 30")
    console = Console(width=200, record=True)
    console.print(trials_table(study))
    assert "pruned: pruned by hyperband at step 30" in console.export_text()


def test_a_failure_without_a_recorded_reason_is_called_a_lost_worker_only_when_it_was_retried() -> None:
    import optuna
    from rich.console import Console

    from autopeft.cli import trials_table

    study = optuna.create_study(directions=["maximize", "minimize"])
    for _ in range(3):  # failed by Optuna, not by the trial's code: no fail_reason
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    retry = study.ask()
    retry.set_user_attr("retry_of", 0)  # what the stale-trial callback enqueues for a lost worker
    study.tell(retry, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial({}, user_attrs={"retry_of": 2})  # not run yet
    console = Console(width=300, record=True)
    console.print(trials_table(study))
    rows = [line for line in console.export_text().splitlines() if "fail" in line]
    assert "worker stopped (no heartbeat); its configuration ran again as trial 3" in rows[0]
    assert "failed outside the trial's code" in rows[1] and "worker" not in rows[1]
    assert "worker stopped (no heartbeat); its configuration waits to run again as trial 4" in rows[2]


def test_a_study_ranked_on_memory_shows_each_trials_peak_in_its_table() -> None:
    import optuna
    from rich.console import Console

    from autopeft.cli import trials_table

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("config", {"objectives": ["accuracy", "forgetting", "memory"]})
    trial = study.ask()
    trial.set_user_attr("val_accuracy", 0.7)
    trial.set_user_attr("forgetting", 0.01)
    study.tell(trial, [0.7, 0.01, 300 * 2**20])
    console = Console(width=200, record=True)
    console.print(trials_table(study))
    text = console.export_text()
    assert "memory" in text and "300.0 MiB" in text


def test_a_scalar_studys_summary_names_the_pick_of_its_own_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna
    from rich.console import Console

    from autopeft import cli
    from autopeft.config import SearchConfig

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("config", {"objective_mode": "scalar", "forgetting_weight": 0.5})
    for accuracy, forgetting in [(0.80, 0.30), (0.75, 0.02)]:  # 0.65 and 0.74 on the objective
        trial = study.ask()
        trial.set_user_attr("params", {"method": "lora", "lora.r": 8, "learning_rate": 1e-3})
        trial.set_user_attr("val_accuracy", accuracy)
        trial.set_user_attr("forgetting", forgetting)
        study.tell(trial, accuracy - 0.5 * forgetting)
    console = Console(width=300, record=True)
    monkeypatch.setattr(cli, "console", console)
    cli._print_summary(study, SearchConfig(objective_mode="scalar", forgetting_weight=0.5), None)
    text = console.export_text()
    assert ("chosen (best-scalar rule): trial 1, val accuracy 0.7500, forgetting 0.0200 -- the trial with the "
            "highest val accuracy - 0.5 x forgetting (the scalar objective)") in text
    rows = [line for line in text.splitlines() if "lora(" in line]
    cells = [[cell.strip() for cell in row.split("│")[3:6]] for row in rows]  # val acc, forgetting, objective
    assert cells == [["0.8000", "0.3000", "0.6500"], ["0.7500", "0.0200", "0.7400"]]


def test_the_progress_bar_counts_a_resumed_studys_trials_and_gives_an_eta() -> None:
    import optuna

    from autopeft.cli import SearchProgress

    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy in (0.7, 0.6):  # one finished before this run, one in it
        trial = study.ask()
        trial.set_user_attr("val_accuracy", accuracy)
        trial.set_user_attr("forgetting", 0.01)
        study.tell(trial, [accuracy, 0.01])
    from autopeft.config import SearchConfig
    from autopeft.study import completed_before

    with tempfile.TemporaryDirectory() as folder:  # a resumed study's bar starts at its completed trials
        stored = optuna.create_study(study_name="s", storage=f"sqlite:///{folder}/o.db", directions=study.directions)
        stored.add_trial(study.trials[0])
        assert completed_before(SearchConfig(study="s", storage=f"sqlite:///{folder}/o.db")) == 1
    assert SearchProgress(4, done=1).bar.tasks[0].completed == 1
    progress = SearchProgress(4, done=1)
    progress(study, study.trials[1])
    shown = progress.bar.tasks[0]
    assert shown.completed == 2 and shown.fields["best"] == "0.7000"
    assert shown.fields["eta"] != "-"  # two trials left at this run's pace


def test_the_eta_is_the_trials_pace_not_the_model_loading_before_them() -> None:
    """The clock once started when the bar did, before the model loaded: a tiny search's ETA read 17 s for 1 s."""
    import datetime

    import optuna

    from autopeft.cli import SearchProgress

    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    trial.set_user_attr("val_accuracy", 0.7)
    trial.set_user_attr("forgetting", 0.01)
    study.tell(trial, [0.7, 0.01])
    progress = SearchProgress(3)  # made now, as if the model had loaded for the minute before
    finished = study.trials[0]
    finished.datetime_start = datetime.datetime.now() - datetime.timedelta(seconds=60)  # the trial took a minute
    progress(study, finished)
    assert progress.bar.tasks[0].fields["eta"] in ("00:02:00", "00:02:01")  # two trials left at a minute each


def test_a_scalar_studys_progress_bar_shows_the_best_objective_not_the_best_accuracy() -> None:
    import optuna

    from autopeft.cli import SearchProgress

    study = optuna.create_study(direction="maximize")
    for accuracy, forgetting in ((0.8, 0.3), (0.75, 0.02)):  # objective at weight 0.5: 0.65, 0.74
        trial = study.ask()
        trial.set_user_attr("val_accuracy", accuracy)
        trial.set_user_attr("forgetting", forgetting)
        study.tell(trial, accuracy - 0.5 * forgetting)
    progress = SearchProgress(4, scalar=True)
    progress(study, study.trials[1])
    assert progress.bar.tasks[0].fields["best"] == "0.7400"
    assert "best objective" in progress.bar.columns[3].text_format


def test_a_command_run_in_process_gives_back_ctrl_c_and_the_warning_format(
        tmp_path: Path, tiny_search_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a process that goes on after the command (a notebook), a search left its Ctrl-C handler installed and,
    once interrupted, its stop flag set: every later search stopped at its first step. Each command also wrapped
    the warning format once more, until a warning overflowed the stack."""
    import warnings

    from typer.testing import CliRunner

    from autopeft import interrupt, search
    from autopeft.cli import app

    def interrupted(*args: object, **kwargs: object) -> None:
        interrupt.REQUESTED.set()  # as Ctrl-C inside a library that swallowed the KeyboardInterrupt would leave it
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "run_search", interrupted)
    monkeypatch.chdir(tmp_path)
    handler = signal.getsignal(signal.SIGINT)
    formats = []
    for _ in range(2):
        done = CliRunner().invoke(app, ["search", "--trials", "1", *tiny_search_args])
        assert done.exit_code == 130, done.output
        assert signal.getsignal(signal.SIGINT) is handler and not interrupt.REQUESTED.is_set()
        formats.append(warnings.formatwarning)
    assert formats[0] is formats[1]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = autopeft("--debug", "search", "--model", "./missing", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" in done.stderr and "--model: ./missing does not exist" in done.stderr


def test_a_study_is_not_resumed_with_another_space_unless_forced(tmp_path: Path, tiny_search_args: list[str]) -> None:
    (tmp_path / "mora.yaml").write_text("method: mora\n")  # autopeft's own adapter files, not peft's
    assert autopeft_here("search", "--trials", "1", "--space", "mora.yaml", *tiny_search_args, cwd=tmp_path).returncode == 0
    (tmp_path / "other.yaml").write_text("method: ia3\n")
    before = (tmp_path / "autopeft.db").read_bytes()
    refused = autopeft_here("search", "--trials", "1", "--space", "other.yaml", *tiny_search_args, cwd=tmp_path)
    assert refused.returncode == 2 and "already exists with a different search space" in refused.stderr
    assert (tmp_path / "autopeft.db").read_bytes() == before
    forced = autopeft_here("search", "--trials", "1", "--space", "other.yaml", "--force-new", *tiny_search_args, cwd=tmp_path)
    assert forced.returncode == 0 and "ia3(" in forced.stdout
    # The replaced study's trial 0 left MoRA's files in the folder of the new trial 0, and they were loaded.
    assert not (tmp_path / "autopeft-artifacts" / "default" / "trial-0" / "autopeft_adapter.json").exists()
    exported = autopeft_here("export", "--out", "out", "--with-weights", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr


def test_a_resume_may_loosen_the_memory_budget_but_not_drop_it_below_a_completed_trial(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    """Below a trial's estimate the sampler kept proposing that trial's region (its constraint was met against the
    old budget) and the summary chose it."""
    assert autopeft_here("search", "--trials", "1", *tiny_search_args, cwd=tmp_path).returncode == 0
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'autopeft.db'}")
    recorded = study.trials[0].user_attrs["memory_estimate"]
    assert recorded["level"] == "analytic"  # no budget: the quick figure, which the gate trusts only far above one
    before = (tmp_path / "autopeft.db").read_bytes()
    refused = autopeft_here("search", "--trials", "2", "--memory-budget", str(recorded["total"] // 2), *tiny_search_args,
                            cwd=tmp_path)
    assert refused.returncode == 2 and "completed trial 0 estimated above --memory-budget" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and (tmp_path / "autopeft.db").read_bytes() == before
    loosened = autopeft_here("search", "--trials", "2", "--memory-budget", "1GiB", *tiny_search_args, cwd=tmp_path)
    assert loosened.returncode == 0, loosened.stderr


def test_a_resume_says_when_it_changes_how_trials_are_chosen(tmp_path: Path, tiny_search_args: list[str]) -> None:
    """A resume may change the sampler, but did so silently: a grid study resumed without --sampler grid went on
    with TPE, which repeated a configuration the grid had run."""
    first = autopeft_here("search", "--trials", "1", "--sampler", "random", *tiny_search_args, cwd=tmp_path)
    assert first.returncode == 0 and "resuming" not in first.stdout
    again = autopeft_here("search", "--trials", "1", *tiny_search_args, cwd=tmp_path)
    assert again.returncode == 0
    assert "resuming study default with --sampler tpe (it ran with --sampler random before)" in again.stdout


def test_a_resume_names_what_changed_in_the_data_and_takes_the_same_file_by_any_path(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    rows = "".join(f"review {i} {'fine' if i % 2 else 'dull'},{i % 2}\n" for i in range(60))
    (tmp_path / "reviews.csv").write_text("text,label\n" + rows)
    first = autopeft_here("search", "--trials", "1", "--task", "reviews.csv", *tiny_search_args, cwd=tmp_path)
    assert first.returncode == 0
    assert "data: train 30 rows, validation 15 rows, test 15 rows" in first.stdout  # 60 rows, split 2:1:1 as asked
    assert "fewer rows than asked: --train-size 120 (got 30), --val-size 60 (got 15)" in first.stdout
    assert "exceeds the 30 training rows" not in " ".join(first.stdout.split())  # micro-batch 16
    again = autopeft_here("search", "--trials", "1", "--task", str(tmp_path / "reviews.csv"), *tiny_search_args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    (tmp_path / "reviews.csv").write_text("text,label\n" + rows.replace("review 7 fine", "review 7 great"))
    refused = autopeft_here("search", "--trials", "1", "--task", "reviews.csv", *tiny_search_args, cwd=tmp_path)
    assert refused.returncode == 2
    assert "a different data split (other rows in " in refused.stderr, refused.stderr


def test_the_summary_warns_when_a_micro_batch_holds_the_whole_training_split(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    rows = "".join(f"review {i} {'fine' if i % 2 else 'dull'},{i % 2}\n" for i in range(60))
    (tmp_path / "reviews.csv").write_text("text,label\n" + rows)  # 30 training rows
    (tmp_path / "big.yaml").write_text("method: ia3\ntraining:\n  micro_batch_size: 32\n")
    done = autopeft_here("search", "--trials", "1", "--task", "reviews.csv", "--space", "big.yaml", *tiny_search_args,
                         cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: micro-batch 32 exceeds the 30 training rows" in " ".join(done.stdout.split())


def test_the_summary_warns_of_a_trial_measured_above_the_memory_budget(
        tmp_path: Path, tiny_search_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial admitted on its estimate may measure a little above the budget (on the CPU, some kilobytes the
    trace does not see): the table showed it and nothing said the budget was not kept."""
    from autopeft import search

    (tmp_path / "one.yaml").write_text("method: ia3\ntraining:\n  micro_batch_size: 8\n")
    budget = 2**30
    for measured, folder in ((budget + 14_000, "over"), (budget, "at")):
        monkeypatch.setattr(search, "measure_memory", lambda runtime, params, peak=measured: peak)
        (tmp_path / folder).mkdir()
        done = autopeft_here("search", "--trials", "2", "--space", str(tmp_path / "one.yaml"), "--memory-budget",
                             "1GiB", *tiny_search_args, cwd=tmp_path / folder)
        assert done.returncode == 0, done.stderr
        said = " ".join(done.stdout.split())
        warned = ("warning: measured above the --memory-budget they were admitted under (their estimates were "
                  "within it): trial 0 1.0 GiB, 13.7 KiB over its 1.0 GiB; trial 1 1.0 GiB, 13.7 KiB over its 1.0 GiB")
        assert (warned in said) == (folder == "over"), said
    # Resumed under a looser budget, each trial is held to the budget it was admitted under.
    done = autopeft_here("search", "--trials", "3", "--space", str(tmp_path / "one.yaml"), "--memory-budget", "2GiB",
                         *tiny_search_args, cwd=tmp_path / "over")
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert warned in said and "trial 2" not in said.split("warning: measured above")[1], said


def test_local_workers_read_the_searchs_target_and_share_its_step_budget_and_the_summary_says_why_they_stopped(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    """The study once recorded --trials 0 for `--workers N`, and each worker started a trial under a step budget
    that only finished trials counted: three workers at 30 steps a trial spent 90 of 60. With no tracking server
    answering, the workers logged to the fallback store and said so, but the summary, printed last, did not."""
    down = f"http://127.0.0.1:{free_port()}"
    done = autopeft("search", "--workers", "2", "--trials", "3", "--max-total-steps", "3", "--tracking-uri", down,
                    *tiny_search_args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "stopped at the training-step budget: 3 of 3 steps spent" in done.stdout  # the search's own summary
    said = " ".join(done.stdout.split())  # the summary's words (a worker says "its runs went to")
    assert "it stopped answering; runs from then on are in sqlite:///mlflow-fallback.db" in said
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'autopeft.db'}")
    assert study.user_attrs["config"]["trials"] == 3  # a worker joining later needs no --trials
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 1
    assert sum(t.user_attrs.get("steps_trained", 0) for t in study.trials) == 3
    again = autopeft("search", "--workers", "2", "--trials", "3", "--max-total-steps", "3", *tiny_search_args,
                     cwd=tmp_path)
    assert again.returncode == 0 and "stopped at the training-step budget: 3 of 3 steps spent" in again.stdout
    assert "worker done" not in again.stdout  # no worker was started (each loaded the model to do nothing)


def test_the_workers_fallback_store_counts_when_it_was_written_during_the_search(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What tells the summary of `search --workers N` that a worker fell back: the fallback store in the folder the
    workers ran in, written since the search began (an older one is another search's)."""
    import datetime

    from autopeft.cli import _fallback_written_since

    monkeypatch.chdir(tmp_path)
    began = datetime.datetime.now()
    assert _fallback_written_since(began) is None
    store = tmp_path / "mlflow-fallback.db"
    store.write_bytes(b"")
    os.utime(store, (began.timestamp() - 60, began.timestamp() - 60))
    assert _fallback_written_since(began) is None
    os.utime(store, (began.timestamp() + 1, began.timestamp() + 1))
    assert _fallback_written_since(began) == "sqlite:///mlflow-fallback.db"

def test_a_search_that_completes_no_trial_exits_1(tmp_path: Path, tiny_search_args: list[str]) -> None:
    """Every trial of this space fails (more virtual tokens than the tiny model has positions): the search stops,
    says why, and a script running it must see that it produced nothing; it exited 0."""
    (tmp_path / "broken.yaml").write_text("method: prompt\nmethods:\n  prompt:\n    num_virtual_tokens: 500\n")
    done = autopeft_here("search", "--space", "broken.yaml", "--max-consecutive-failures", "1", *tiny_search_args,
                         cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "stopped after 1 consecutive failed trial; last reason:" in done.stdout and "500 virtual tokens" in done.stdout


def test_export_of_a_study_without_completed_trials_is_a_clear_error(tmp_path: Path, tiny_search_args: list[str]) -> None:
    created = autopeft_here("search", "--trials", "0", "--study", "empty", *tiny_search_args, cwd=tmp_path)
    assert created.returncode == 0 and "study created with no trials; start workers: autopeft worker" in created.stdout
    assert "autopeft export" not in created.stdout  # nothing to export yet
    done = autopeft_here("export", "--study", "empty", "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "'empty' has no completed trial to export" in done.stderr
    assert not (tmp_path / "x").exists()
    idle = autopeft_here("worker", "--study", "empty", "--storage", "sqlite:///autopeft.db", cwd=tmp_path)
    assert idle.returncode == 2 and "was created with --trials 0, so it has no target; pass --trials N" in idle.stderr
    elsewhere = tmp_path / "elsewhere"  # a worker not told the tracking store logs to the study's
    elsewhere.mkdir()
    joined = autopeft_here("worker", "--study", "empty", "--storage", f"sqlite:///{tmp_path}/autopeft.db", "--trials", "1",
                           cwd=elsewhere)
    assert joined.returncode == 0, joined.stderr
    assert not (elsewhere / "mlflow.db").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("autopeft.role") == "study")
    assert [r.data.tags.get("autopeft.state") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id] \
        == ["COMPLETE"]


def test_a_worker_logging_to_a_store_of_its_own_leaves_the_studys_parent_run_where_the_study_records_it(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    """Such a worker once moved the study's pointer to its own parent run: `report` then looked for that run in
    the study's store and refused, and the next worker on the study's store opened a third parent."""
    from mlflow.tracking import MlflowClient

    assert autopeft_here("search", "--trials", "0", *tiny_search_args, cwd=tmp_path).returncode == 0
    storage = ["--study", "default", "--storage", "sqlite:///autopeft.db"]
    own = autopeft_here("worker", *storage, "--trials", "1", "--tracking-uri", "sqlite:///own.db", cwd=tmp_path)
    assert own.returncode == 0, own.stderr
    shared = autopeft_here("worker", *storage, "--trials", "2", cwd=tmp_path)
    assert shared.returncode == 0, shared.stderr

    def runs(store: str) -> tuple[list, list]:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / store}")
        found = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])
        return ([r for r in found if r.data.tags.get("autopeft.role") == "study"],
                [r for r in found if r.data.tags.get("autopeft.role") == "trial"])

    (parent,), trials = runs("mlflow.db")
    (own_parent,), own_trials = runs("own.db")
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'autopeft.db'}")
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert [r.data.tags["mlflow.parentRunId"] for r in trials] == [parent.info.run_id]
    assert [r.data.tags["mlflow.parentRunId"] for r in own_trials] == [own_parent.info.run_id]
    assert own_parent.data.metrics["base_val_accuracy"] == parent.data.metrics["base_val_accuracy"]
    report = autopeft_here("report", "--out", "r", cwd=tmp_path)
    assert report.returncode == 0 and "logged to MLflow run" in report.stdout, report.stderr

def test_export_and_its_recipe_run_from_another_folder_and_an_export_refuses_changed_data_before_writing(
        tmp_path: Path, tiny_search_args: list[str]) -> None:
    searched, elsewhere = tmp_path / "searched", tmp_path / "elsewhere"
    searched.mkdir(), elsewhere.mkdir()
    (searched / "mine.yaml").write_text("method: lora\ntraining:\n  learning_rate: 0.001\n  micro_batch_size: 8\n")
    rows = "".join(f"review {i} {'fine' if i % 2 else 'dull'},{i % 2}\n" for i in range(80))
    (searched / "reviews.csv").write_text("text,label\n" + rows)
    assert autopeft_here("search", "--trials", "1", "--space", "mine.yaml", "--task", "reviews.csv", *tiny_search_args,
                         cwd=searched).returncode == 0
    storage = f"sqlite:///{searched / 'autopeft.db'}"
    refused = autopeft_here("export", "--study", "default", "--storage", storage, "--tolerance", "-1", "--out", "x",
                            cwd=elsewhere)
    assert refused.returncode == 2 and "--tolerance: -1.0 must be a finite number, 0 or more" in refused.stderr
    assert not (elsewhere / "x").exists()
    done = autopeft_here("export", "--study", "default", "--storage", storage, "--out", "x", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "x" / "metrics.json").is_file()
    # The recipe names the data by its absolute path, so it trains from any folder.
    assert f"task: {searched / 'reviews.csv'}" in (elsewhere / "x" / "training.yaml").read_text()
    trained = autopeft_here("train", "--config", "x/training.yaml", "--max-steps", "1", "--out", "t",
                            "--tracking-uri", f"sqlite:///{elsewhere / 'mlflow.db'}", cwd=elsewhere)
    assert trained.returncode == 0 and "warning" not in trained.stdout, trained.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{elsewhere / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])
    assert {"probe.linear_probe_accuracy", "probe.generalization_gap"} <= set(run.data.metrics)  # as a trial's
    (searched / "reviews.csv").write_text("text,label\n" + rows.replace("review 3 fine", "review 3 great"))
    changed = autopeft_here("export", "--study", "default", "--storage", storage, "--out", "y", cwd=elsewhere)
    assert changed.returncode == 2 and "'default' was searched on other data (other rows in" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and not (elsewhere / "y").exists()
    # A retrain on the changed data runs (the recipe may be reused on new data) but says it is not the trial's.
    again = autopeft_here("train", "--config", "x/training.yaml", "--max-steps", "1", "--out", "t2",
                          "--tracking-uri", f"sqlite:///{elsewhere / 'mlflow.db'}", cwd=elsewhere)
    said = " ".join(again.stdout.split())
    assert again.returncode == 0 and "rows differ from those x/training.yaml's trial was trained and scored on" in said


READERS = [["export", "--out", "x"], ["report"], ["worker", "--study", "default", "--storage", "sqlite:///autopeft.db"]]


@pytest.mark.parametrize("command", READERS, ids=[c[0] for c in READERS])
def test_a_command_that_reads_a_study_creates_no_store_on_a_wrong_name(tmp_path: Path, command: list[str]) -> None:
    """export and report read the study `autopeft search` names by default; a missing one is one line, exit 2,
    and no empty autopeft.db left behind (SQLAlchemy creates the file on connect)."""
    done = autopeft_here(*command, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no study named 'default' in sqlite:///autopeft.db" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="session")  # session, not module: xdist may hand this module's tests out in pieces
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_search_args: list[str]) -> Path:
    """A folder holding a one-trial study, its MLflow store and its export (export/training.yaml)."""
    folder = tmp_path_factory.mktemp("exported")
    assert autopeft_here("search", "--trials", "1", *tiny_search_args, cwd=folder).returncode == 0
    assert autopeft_here("export", "--out", "export", cwd=folder).returncode == 0
    return folder


OTHER_BAD_INPUTS = [
    (["train", "--config", "export/training.yaml", "--max-steps", "0", "--out", "t"], "--max-steps: 0 must be at least 1"),
    (["train", "--config", "export/training.yaml", "--seed", "-3", "--out", "t"], "--seed: -3 must be between 0 and"),
    (["train", "--config", "export/training.yaml", "--out", "/proc/autopeft"], "--out: cannot create /proc/autopeft"),
    (["train", "--config", "export/README.md", "--out", "t"], "--config: export/README.md is not valid YAML at line"),
    (["export", "--out", "/proc/autopeft"], "--out: cannot create /proc/autopeft"),
    (["report", "--out", "/proc/autopeft"], "--out: cannot create /proc/autopeft"),
    (["report", "--out", "r", "--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri: cannot read http://127.0.0.1:9: "),
    (["report", "--out", "r", "--tracking-uri", "sqlite:///other.db"],
     "--tracking-uri: no MLflow store at sqlite:///other.db (the search logged to sqlite:////"),
    # Tracebacks from MLflow before: a scheme it has no store for, a bare path (its retired file store), no database.
    (["report", "--out", "r", "--tracking-uri", "garbage://x"], "--tracking-uri: 'garbage://x' is not a store MLflow logs to"),
    (["report", "--out", "r", "--tracking-uri", "mlflow.db"], "--tracking-uri: 'mlflow.db' is not a store MLflow logs to"),
    (["report", "--out", "r", "--tracking-uri", "sqlite:///export/README.md"],
     "--tracking-uri: export/README.md is not an MLflow store (it holds no MLflow tables)"),
    (["export", "--out", "x", "--trial", "0", "--select", "best-accuracy"], "--trial 0 and --select best-accuracy: choose one"),
    (["export", "--out", "x", "--select", "best-accuracy", "--tolerance", "0.1"],
     "--tolerance: applies to the balanced rule only, and this export uses the best-accuracy rule"),
    (["export", "--out", "x", "--trial", "0", "--tolerance", "0.1"], "--tolerance: applies to the balanced rule only"),
    (["export", "--out", "x", "--select", "max-accuracy-under-forgetting=low"], "the threshold after '=' must be a number"),
    (["export", "--out", "x", "--tolerance", "nan"], "--tolerance: nan must be a finite number, 0 or more"),
    (["report", "--out", "r", "--tolerance", "nan"], "--tolerance: nan must be a finite number, 0 or more"),
    (["export", "--out", "x", "--select", "max-accuracy-under-forgetting=nan"], "the threshold after '=' must be a number"),
    (["report", "--out", "r", "--select", "newest"], "--select: 'newest' is not one of balanced, best-accuracy"),
    (["report", "--out", "r", "--select", "least-forgetting", "--tolerance", "0.1"], "--tolerance: applies to the balanced"),
    (["worker", "--study", "default", "--storage", "sqlite:///autopeft.db", "--worker-id", "-3"], "--worker-id: -3 must be 0 or more"),
    (["estimate", "--config", "export/training.yaml", "--model", "packaged:all-MiniLM-L6-v2"],
     "--model: a --config recipe names its own model"),
    (["estimate", "--config", "export/training.yaml", "--task-type", "causal_lm"], "--task-type: a --config recipe names its own"),
    (["ui", "--port", "99999"], "--port: 99999 must be between 1 and 65535"),
    (["ui", "--tracking-uri", "http://me:pw@127.0.0.1:5555"],  # `mlflow ui` crashed on a server's URI
     ("--tracking-uri: http://me:***@127.0.0.1:5555 is a tracking server, which serves its own dashboard: open "
      "http://127.0.0.1:5555 in a browser")),
    (["sync", "--source", "sqlite:///mlflow.db", "--target", "sqlite:///./mlflow.db"], "--target: sqlite:///./mlflow.db is the store --source names"),
    # An unreadable source was blamed on --target.
    (["sync", "--source", "http://127.0.0.1:9", "--target", "sqlite:///x.db"], "--source: cannot read http://127.0.0.1:9: "),
    (["estimate", "--model", "./no/such/model"], "--model: ./no/such/model does not exist"),
    (["estimate", "--config", "export/training.yaml", "--seq-len", "1000"],  # a traceback from the tracer before
     "--seq-len: 1000 tokens exceed"),
    (["estimate", "--model", "nobody/no-such-model"], "--model: cannot load 'nobody/no-such-model'"),
    # Ignored before: --confirm-top without --confirm-seeds, or beside --trial.
    (["export", "--out", "x", "--confirm-top", "5"], "--confirm-top: applies with --confirm-seeds only"),
    (["export", "--out", "x", "--trial", "0", "--confirm-seeds", "1", "--confirm-top", "2"],
     "--confirm-top: --trial 0 is the one candidate --confirm-seeds retrains"),
    (["export", "--out", "x", "--tracking-uri", "sqlite:///mlflow.db"], "--tracking-uri: applies with --confirm-seeds only"),
    # MLflow created the missing store and the confirmation's metrics went nowhere, exit 0.
    (["export", "--out", "x", "--confirm-seeds", "1", "--tracking-uri", "sqlite:///moved.db"],
     "--tracking-uri: no MLflow store at sqlite:///moved.db"),
]


@pytest.mark.parametrize(("args", "message"), OTHER_BAD_INPUTS, ids=[f"{a[0]}: {m}" for a, m in OTHER_BAD_INPUTS])
def test_bad_input_to_the_other_commands_is_one_line_exit_2_and_nothing_written(exported: Path, args: list[str],
                                                                               message: str) -> None:
    before = sorted(exported.rglob("*"))
    done = autopeft_here(*args, cwd=exported)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(exported.rglob("*")) == before


@pytest.mark.parametrize(("args", "option"), [
    (["report", "--out", "r", "--tracking-uri", "sqlite:///autopeft.db"], "--tracking-uri"),
    (["ui", "--tracking-uri", "sqlite:///autopeft.db"], "--tracking-uri"),
    (["sync", "--source", "sqlite:///autopeft.db", "--target", "sqlite:///copy.db"], "--source"),
], ids=["report", "ui", "sync"])
def test_the_study_database_given_as_an_mlflow_store_is_refused_untouched(exported: Path, args: list[str],
                                                                           option: str) -> None:
    """An easy slip (autopeft.db for mlflow.db): MLflow wrote its tables into the study's database, then failed
    with a traceback."""
    before = (exported / "autopeft.db").read_bytes()
    done = autopeft_here(*args, cwd=exported)
    assert done.returncode == 2, done.stderr
    assert f"error: {option}: autopeft.db is not an MLflow store (it holds no MLflow tables)" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (exported / "autopeft.db").read_bytes() == before
    assert not (exported / "copy.db").exists()


STORE_SLIPS = [
    (["search", "--storage", "sqlite:///mlflow.db"], "--storage, --tracking-uri: both name mlflow.db; the Optuna study"),
    (["search", "--storage", "sqlite:///mlflow.db", "--tracking-uri", "sqlite:///runs.db"],
     "--storage: mlflow.db is not an Optuna store (it holds another program's tables)"),
    (["export", "--out", "x", "--storage", "sqlite:///mlflow.db"], "--storage: mlflow.db is not an Optuna store"),
    (["report", "--out", "r", "--storage", "sqlite:///mlflow.db"], "--storage: mlflow.db is not an Optuna store"),
    (["worker", "--study", "default", "--storage", "sqlite:///mlflow.db"], "--storage: mlflow.db is not an Optuna store"),
    (["search", "--tracking-uri", "sqlite:///autopeft.db"], "--storage, --tracking-uri: both name autopeft.db"),
    (["train", "--config", "export/training.yaml", "--out", "t", "--tracking-uri", "sqlite:///autopeft.db"],
     "--tracking-uri: autopeft.db is not an MLflow store (it holds another program's tables)"),
    (["sync", "--source", "sqlite:///mlflow.db", "--target", "sqlite:///autopeft.db"],
     "--target: autopeft.db is not an MLflow store (it holds another program's tables)"),
    (["search", "--storage", "sqlite:///:memory:"], "--storage: sqlite:///:memory: is an in-memory database"),
    (["estimate", "--space", "export"], "export: a folder; a search space is a YAML file"),
    (["train", "--config", "export", "--out", "t"], "--config: export is a folder; give its training.yaml"),
]


@pytest.mark.parametrize(("args", "message"), STORE_SLIPS, ids=[m for _, m in STORE_SLIPS])
def test_a_store_of_the_other_kind_is_refused_before_either_program_writes_to_it(exported: Path, args: list[str],
                                                                                message: str) -> None:
    """Optuna wrote its tables into MLflow's store and MLflow into the study's (search, export, report, worker,
    train, sync): a store named for the other was changed, then the command failed or fell back."""
    before = {name: (exported / name).read_bytes() for name in ("autopeft.db", "mlflow.db")}
    files = sorted(exported.rglob("*"))
    done = autopeft_here(*args, cwd=exported)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert {name: (exported / name).read_bytes() for name in before} == before
    assert sorted(exported.rglob("*")) == files


@pytest.mark.parametrize(("line", "message"), [
    ("learning_rate: -1", "learning_rate: -1 must be >= 1e-08"),
    ("optimizer: lion", "optimizer: 'lion' must be one of"),
    ("micro_batch_size: 0", "micro_batch_size: 0 must be >= 1"),
    ("precision: fp8", "precision: 'fp8' must be one of"),
    # Found when the data loads; once worded for the search's options, which `autopeft train` does not have.
    ("label_column: stars", "label_column: 'stars' does not apply to task packaged:rotten_tomatoes"),
    # Values of another kind failed as "training failed: AttributeError ..." (exit 1), one after an MLflow run began.
    ("model: 5", "model: 5 must be a text"),
    ("task: [x]", "task: ['x'] must be a text"),
    ("template: 5", "template: 5 must be a text, or null"),
    ("probes: linear_probe", "probes: 'linear_probe' must be a list of one or more texts, or null"),
    ("probes: []", "probes: [] must be a list of one or more texts, or null"),  # ran the default probes
    ("seed: 18446744073709551616", "seed: 18446744073709551616 must be below 2**64 (a seed)"),
    ("split_seed: 4294967296", "split_seed: 4294967296 must be below 2**32 (a seed)"),
])
def test_a_recipe_with_a_bad_training_value_is_refused_before_training(exported: Path, tmp_path: Path, line: str,
                                                                       message: str) -> None:
    key = line.split(":")[0]
    recipe = [row for row in (exported / "export" / "training.yaml").read_text().splitlines()
              if not row.startswith(f"{key}:")]
    (tmp_path / "edited.yaml").write_text("\n".join([*recipe, line]) + "\n")
    for command in (["train", "--out", "t"], ["estimate"])[:1 if key != "optimizer" else 2]:  # one recipe reader
        done = autopeft_here(command[0], "--config", "edited.yaml", *command[1:], cwd=tmp_path)
        assert done.returncode == 2 and f"edited.yaml: {message}" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.yaml"]


def test_a_recipe_whose_prompt_runs_off_the_positions_is_refused_before_its_run(exported: Path, tmp_path: Path) -> None:
    """500 virtual tokens on a 128-position model failed as 'training failed' (exit 1), leaving a FAILED MLflow run."""
    import yaml

    recipe = yaml.safe_load((exported / "export" / "training.yaml").read_text())
    recipe.update(method="prompt", method_params={"num_virtual_tokens": 500, "init": "random"})
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(recipe))
    done = autopeft_here("train", "--config", "edited.yaml", "--out", "t", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "edited.yaml: method_params: prompt: 500 virtual tokens + the longest input's" in done.stderr
    assert "num_virtual_tokens " in done.stderr and "--max-length" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.yaml"]  # no run, no store, no folder


def test_a_recipe_this_machine_cannot_run_is_refused_before_its_run(exported: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """adamw_8bit (or qlora) without bitsandbytes failed as 'training failed: TrialPruned: skipped: ...' (exit 1)
    and left a FAILED run in a new MLflow store."""
    import importlib.util

    import yaml

    from autopeft.errors import ConfigError
    from autopeft.training_run import train_from_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    recipe = yaml.safe_load((exported / "export" / "training.yaml").read_text())
    recipe.update(optimizer="adamw_8bit")
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"edited\.yaml: optimizer: adamw_8bit needs the bitsandbytes package"):
        train_from_recipe(tmp_path / "edited.yaml", tmp_path / "t", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.yaml"]  # no run, no store, no folder


def test_a_report_whose_page_would_overwrite_a_folder_is_refused_before_drawing(exported: Path, tmp_path: Path) -> None:
    """report.html a folder in --out: a traceback after the four plots were written."""
    (tmp_path / "r" / "report.html").mkdir(parents=True)
    done = autopeft_here("report", "--out", str(tmp_path / "r"), cwd=exported)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "report.html is a folder where the report writes a file" in done.stderr
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["report.html"]


def test_export_names_the_studys_model_when_it_has_moved(tmp_path: Path, tiny_bert: Path,
                                                           tiny_search_args: list[str]) -> None:
    """It named --model, an option export does not have."""
    shutil.copytree(tiny_bert, tmp_path / "m")
    args = [a if a != str(tiny_bert) else "m" for a in tiny_search_args]
    assert autopeft_here("search", "--trials", "1", *args, cwd=tmp_path).returncode == 0
    (tmp_path / "m").rename(tmp_path / "moved")
    done = autopeft_here("export", "--out", "e", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the model study 'default' recorded (export reads it from there): " in done.stderr
    assert "--model" not in done.stderr and not (tmp_path / "e").exists()


def test_export_with_force_removes_an_earlier_exports_files_and_keeps_the_users(exported: Path) -> None:
    """peft would load a stale adapter_model.* under the new trial's config with only a warning."""
    out = exported / "again"
    out.mkdir()
    for stale in ("adapter_model.safetensors", "autopeft_adapter.json", "adapter_config.json"):
        (out / stale).write_text("from an earlier export")
    (out / "notes.txt").write_text("mine")
    done = autopeft_here("export", "--out", "again", "--force", cwd=exported)
    assert done.returncode == 0, done.stderr
    kept = sorted(p.name for p in out.iterdir())
    assert "adapter_model.safetensors" not in kept and "notes.txt" in kept and "metrics.json" in kept
    assert all(p.read_text() != "from an earlier export" for p in out.iterdir() if p.suffix == ".json")


def test_an_export_interrupted_while_it_retrains_leaves_the_earlier_export_whole(
        exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--force once removed the earlier export first, so a Ctrl-C during --confirm-seeds left nothing."""
    import shutil

    from autopeft import export

    out = tmp_path / "kept"
    shutil.copytree(exported / "export", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "confirm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_trial("default", f"sqlite:///{exported / 'autopeft.db'}", out, force=True, confirm_seeds=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_export_into_the_trials_own_adapter_folder_is_refused_and_the_adapter_kept(exported: Path) -> None:
    """With the clearing moved after retraining, --force there deleted the adapter it was about to copy."""
    from autopeft.errors import ConfigError
    from autopeft.export import export_trial

    storage = f"sqlite:///{exported / 'autopeft.db'}"
    folder = Path(optuna.load_study(study_name="default", storage=storage).trials[0].user_attrs["adapter_dir"])
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ConfigError, match="is trial 0's own adapter folder"):
        export_trial("default", storage, folder, force=True)
    assert sorted(p.name for p in folder.iterdir()) == before


def test_the_report_marks_the_pick_of_the_rule_asked_for(exported: Path, tmp_path: Path) -> None:
    done = autopeft_here("report", "--out", str(tmp_path / "r"), "--select", "max-accuracy-under-forgetting=1",
                         cwd=exported)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert "by rule <code>max-accuracy-under-forgetting=1</code>" in page


def test_a_report_from_another_folder_logs_to_the_store_the_study_recorded(exported: Path, tmp_path: Path) -> None:
    """It once looked for ./mlflow.db wherever it ran, and refused while naming the store the study recorded."""
    done = autopeft_here("report", "--out", "r", "--storage", f"sqlite:///{exported / 'autopeft.db'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "logged to MLflow run" in done.stdout and not (tmp_path / "mlflow.db").exists()


def test_estimate_takes_rows_past_a_rotary_models_max_positions_and_refuses_an_encoder_as_causal_lm(tmp_path: Path,
                                                                            tiny_models: dict[str, Path]) -> None:
    """Llama has no position table to run off (the search trains such rows); estimate refused them."""
    (tmp_path / "lora.yaml").write_text("method: lora\n")
    done = autopeft_here("estimate", "--model", str(tiny_models["llama"]), "--space", "lora.yaml", "--seq-len", "200",
                         cwd=tmp_path)
    assert done.returncode == 0 and "x 200 tokens" in " ".join(done.stdout.split()), done.stderr
    encoder = autopeft_here("estimate", "--model", str(tiny_models["bert"]), "--space", "lora.yaml", "--task-type",
                            "causal_lm", cwd=tmp_path)  # an estimate of what the search refuses to train
    assert encoder.returncode == 2 and "--task-type causal_lm: " in encoder.stderr and "is an encoder" in encoder.stderr


def test_estimate_counts_robertas_positions_as_the_search_does(tmp_path: Path) -> None:
    """RoBERTa numbers positions after its padding row: 34 table rows take 32 tokens. `estimate` read the
    config's 34 and traced rows the search refuses and training cannot run."""
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                  max_position_embeddings=34, pad_token_id=1).save_pretrained(tmp_path / "roberta")
    (tmp_path / "lora.yaml").write_text("method: lora\n")
    estimate = ["estimate", "--model", "./roberta", "--space", "lora.yaml", "--seq-len"]
    too_long = autopeft_here(*estimate, "33", cwd=tmp_path)
    assert too_long.returncode == 2, too_long.stdout
    assert "--seq-len: 33 tokens exceed ./roberta's 32 positions; estimate at 32 tokens or fewer" in too_long.stderr
    assert autopeft_here(*estimate, "32", cwd=tmp_path).returncode == 0


def test_estimate_words_a_recipes_values_by_its_keys_and_caps_its_rows_at_the_models_positions(
        exported: Path, tmp_path: Path) -> None:
    """A recipe's max_length of 500 on a 128-position model trains (its rows are short) but was refused as a
    '--seq-len' nobody gave; a recipe whose model moved was '--model: ...', where `train` says 'moved.yaml: model:'."""
    import re

    recipe = (exported / "export" / "training.yaml").read_text()
    (tmp_path / "big.yaml").write_text(re.sub(r"(?m)^max_length: .*$", "max_length: 500", recipe))
    (tmp_path / "moved.yaml").write_text(re.sub(r"(?m)^model: .*$", f"model: {tmp_path / 'gone'}", recipe))
    big = autopeft_here("estimate", "--config", "big.yaml", cwd=tmp_path)
    assert big.returncode == 0 and "x 128 tokens" in big.stdout, big.stderr
    moved = autopeft_here("estimate", "--config", "moved.yaml", cwd=tmp_path)
    assert moved.returncode == 2 and moved.stderr.startswith(f"error: moved.yaml: model: {tmp_path / 'gone'} does not exist")


def test_the_model_checks_read_the_model_at_the_path_now_in_a_process_that_goes_on(tmp_path: Path) -> None:
    """The model checks cached a config by --model as typed: in one process (the Python API, a notebook),
    ./roberta in a second folder was read as the first folder's, and a model saved again at its path as the old."""
    from transformers import RobertaConfig

    def save(folder: str, rows: int) -> None:
        RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                      max_position_embeddings=rows, pad_token_id=1).save_pretrained(tmp_path / folder / "roberta")
        (tmp_path / folder / "lora.yaml").write_text("method: lora\n")

    estimate = ["estimate", "--model", "./roberta", "--space", "lora.yaml", "--seq-len", "40"]
    save("small", 34)
    save("large", 66)
    assert "exceed ./roberta's 32 positions" in autopeft_here(*estimate, cwd=tmp_path / "small").stderr
    large = autopeft_here(*estimate, cwd=tmp_path / "large")
    assert large.returncode == 0, large.stderr
    save("small", 66)  # saved again, larger
    again = autopeft_here(*estimate, cwd=tmp_path / "small")
    assert again.returncode == 0, again.stderr


def test_estimate_counts_a_causal_lms_logits_for_a_causal_task(tmp_path: Path,
                                                               tiny_causal_models: dict[str, Path]) -> None:
    """`estimate` traced every configuration as a classifier; a causal LM trains on logits over its
    vocabulary, which a two-class head does not have."""
    (tmp_path / "space.yaml").write_text("method: ia3\n")

    def total(*task: str) -> float:
        done = autopeft_here("estimate", "--model", str(tiny_causal_models["llama"]), "--space", "space.yaml", *task,
                             cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        line = next(line for line in done.stdout.splitlines() if line.startswith("total"))
        value, unit = line.split()[1:3]
        return float(value) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]

    classifier, causal = total(), total("--task-type", "causal_lm")
    assert causal > classifier + 2**20


def test_sync_from_a_store_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    done = autopeft_here("sync", "--source", "sqlite:///mlflow-fallbak.db", "--target", "sqlite:///mlflow.db", cwd=tmp_path)
    assert done.returncode == 2 and "--source: no MLflow store at sqlite:///mlflow-fallbak.db" in done.stderr
    assert os.listdir(tmp_path) == []


def test_export_of_unknown_study_is_a_clear_error(tmp_path: Path, tiny_search_args: list[str]) -> None:
    assert autopeft_here("search", *tiny_search_args, "--trials", "0", cwd=tmp_path).returncode == 0
    done = autopeft_here("export", "--study", "nope", "--out", "x", cwd=tmp_path)
    assert done.returncode == 2 and "no study named 'nope'" in done.stderr
    assert not (tmp_path / "x").exists()
    secret = autopeft_here("export", "--out", "x", "--storage", "postgresql+psycopg2://nobody:secret@127.0.0.1:9/none",
                           cwd=tmp_path)
    assert secret.returncode == 2 and "nobody:***@127.0.0.1" in secret.stderr and "secret" not in secret.stderr


@pytest.mark.parametrize("stop", ["ctrl-c", "a signal to autopeft alone"])
def test_ui_serves_the_store_on_localhost_refuses_a_busy_port_and_stops_whole(tmp_path: Path, stop: str) -> None:
    """mlflow's web server and job runners once outlived a SIGTERM sent to autopeft alone and kept serving;
    a busy port printed the URL of whatever served there, then exited 0."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("autopeft")
    port = free_port()
    server = subprocess.Popen([*AUTOPEFT, "ui", "--port", str(port)], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline and not body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10",
                                              timeout=2).read().decode()
            except OSError:
                time.sleep(1)
        assert '"autopeft"' in body
        if stop == "ctrl-c":
            busy = autopeft_here("ui", "--port", str(port), cwd=tmp_path)
            assert busy.returncode == 2 and busy.stdout == "" and len(busy.stderr.strip().splitlines()) == 1
            assert f"--port: 127.0.0.1:{port} cannot be served: Address already in use; choose a free one" in busy.stderr
            os.killpg(server.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends: autopeft's process group
        else:
            server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # nothing serves the dashboard any more
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_the_summary_warns_of_held_out_rows_that_repeat_a_training_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from autopeft import cli
    from autopeft.config import SearchConfig

    recording = Console(width=200, record=True)
    monkeypatch.setattr(cli, "console", recording)
    split = {"train_size": 40, "validation_size": 20, "test_size": 20, "validation_rows_in_train": 0,
             "test_rows_in_train": 9}
    cli._print_split(split, SearchConfig(train_size=40, val_size=20, test_size=20).public_dict())  # as recorded
    text = recording.export_text()
    assert "warning: 9 of 20 test rows have the text of a training row" in text and "validation rows" not in text


def test_methods_lists_each_parameters_default_and_allowed_values_and_the_training_parameters() -> None:
    from typer.testing import CliRunner

    from autopeft.cli import app

    listed = CliRunner().invoke(app, ["methods"])
    assert listed.exit_code == 0, listed.output
    text = " ".join(listed.output.replace("│", " ").split())  # table cells wrap: compare the words
    for expected in ("optimizer (adamw; adamw | adafactor | sgd | adamw_8bit)",
                     "micro_batch_size (16; integer >= 1, <= 65536)", "use_rslora (false; true or false)",
                     "init_r (12; integer >= 1, <= 1024)"):
        assert expected in text


def test_estimate_names_a_space_whose_fixed_value_breaks_a_searched_default(tmp_path: Path, tiny_bert: Path) -> None:
    """init_r searched over [10, 16] is estimated at its default 12, which the fixed target_r 12 is not below:
    a traceback before."""
    (tmp_path / "ada.yaml").write_text("method: adalora\nmethods:\n  adalora:\n    init_r: [10, 16]\n    target_r: 12\n")
    done = autopeft_here("estimate", "--model", str(tiny_bert), "--space", "ada.yaml", cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ada.yaml: adalora(init_r=12, target_r=12" in done.stderr
    assert "cannot be built: adalora: target_r (12) must be below init_r (12)" in done.stderr


def test_estimate_names_a_method_the_model_does_not_support(tmp_path: Path, tiny_bert: Path) -> None:
    """Prefix tuning on flex attention, which the search leaves out: a traceback from the tracer before."""
    shutil.copytree(tiny_bert, tmp_path / "flex")
    config = json.loads((tmp_path / "flex" / "config.json").read_text())
    (tmp_path / "flex" / "config.json").write_text(json.dumps({**config, "_attn_implementation": "flex_attention"}))
    (tmp_path / "prefix.yaml").write_text("method: prefix\n")
    done = autopeft_here("estimate", "--model", "flex", "--space", "prefix.yaml", "--seq-len", "16", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        ("error: prefix.yaml: prefix supports eager and sdpa attention, not 'flex_attention' (load the model with "
        "attn_implementation='sdpa')")], done.stderr


def test_estimate_of_a_space_goes_on_past_a_method_it_cannot_build(tmp_path: Path, tiny_bert: Path) -> None:
    """The other methods are estimated and each unbuildable one named in a line, exit 2: it stopped at the first.
    tiny_bert has 128 positions, which prompt tuning's 500 virtual tokens fill on their own."""
    (tmp_path / "s.yaml").write_text("method: [adalora, lora, prompt]\nmethods:\n  adalora:\n    init_r: [10, 16]\n"
                                     "    target_r: 12\n  prompt:\n    num_virtual_tokens: 500\n")
    done = autopeft_here("estimate", "--model", str(tiny_bert), "--space", "s.yaml", cwd=tmp_path)
    assert done.returncode == 2 and "lora(r=8" in done.stdout and "peak training memory" in done.stdout
    problems = done.stderr.strip().splitlines()
    assert len(problems) == 2 and "s.yaml: adalora(" in problems[0] and "cannot be built" in problems[0], problems
    assert "s.yaml: prompt(num_virtual_tokens=500" in problems[1], problems
    assert "use fewer than 127 virtual tokens" in problems[1], problems
    too_long = autopeft_here("estimate", "--model", str(tiny_bert), "--space", "s.yaml", "--seq-len", "200",
                             cwd=tmp_path)  # the row alone does not fit: one line, not one per method
    assert too_long.returncode == 2 and too_long.stderr.strip().splitlines() == [
        f"error: --seq-len: 200 tokens exceed {tiny_bert}'s 128 positions; estimate at 128 tokens or fewer"]
