"""The hand-off: export -> plain peft loads it with the same logits; `autopeft train` reproduces the trial;
`--out` is safe; a trial whose adapter was not kept is retrained for export. Searches and exports run in the test's
process (`autopeft_here`); `train`, which a user runs later from a shell, runs as a process of its own, so the trial
is reproduced from nothing but its recipe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from tests_support import autopeft, autopeft_here


@pytest.fixture(scope="session")  # session, not module: xdist may hand this module's tests out in pieces
def finished_study(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """One finished 2-trial study shared by this module's tests, in any order (each exports into its own
    folder; the one that needs the kept adapters gone hides them and puts them back)."""
    folder = tmp_path_factory.mktemp("handoff")
    done = autopeft_here("search", "--trials", "2", "--study", "h", "--model", str(tiny_bert), "--train-size", "120",
                         "--val-size", "60", "--test-size", "60", "--max-steps", "30", cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder


PLAIN_PEFT = """
import json, sys
sys.modules["autopeft"] = None  # prove the export loads without autopeft
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    print(json.dumps(model(input_ids=torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])).logits.tolist()))
"""


def test_exported_adapter_loads_in_plain_peft_with_the_same_logits(finished_study: Path, tiny_bert: Path) -> None:
    done = autopeft_here("export", "--study", "h", "--out", "out1", "--with-weights", cwd=finished_study)
    assert done.returncode == 0, done.stderr
    out = finished_study / "out1"
    assert {"adapter_config.json", "training.yaml", "metrics.json", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "Why this trial" in card and "autopeft train --config training.yaml" in card
    measured = json.loads((out / "metrics.json").read_text())
    assert measured["val_rows"] == 60 and 0 <= measured["val_accuracy_standard_error"] <= 0.5 / 60 ** 0.5
    assert f"standard error {measured['val_accuracy_standard_error']:.4f} on 60 rows" in card
    assert "how far it leads: val accuracy" in done.stdout
    plain = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(tiny_bert), str(out)], capture_output=True, check=False,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    from peft import PeftModel

    from autopeft.models import load_classifier

    trial = json.loads((out / "metrics.json").read_text())["trial"]
    study = optuna.load_study(study_name="h", storage=f"sqlite:///{finished_study / 'autopeft.db'}")
    adapter_dir = next(t for t in study.trials if t.number == trial).user_attrs["adapter_dir"]
    base, _ = load_classifier(str(tiny_bert), 2, seed=0)
    inside = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        expected = inside(input_ids=torch.tensor([[101, 2023, 3185, 2001, 2307, 102]])).logits
    torch.testing.assert_close(torch.tensor(json.loads(plain.stdout)), expected, atol=1e-5, rtol=1e-5)


def test_the_exported_load_line_runs_as_written_on_a_base_whose_head_has_other_classes(tmp_path: Path,
                                                                                        tiny_bert: Path) -> None:
    """The tiny base carries a 2-label head, as a user's earlier fine-tune would: a 3-class export's README line
    stopped at the head's size mismatch (autopeft itself loads the base with ignore_mismatched_sizes)."""
    import re

    (tmp_path / "three.csv").write_text("text,label\n" + "".join(
        f"{['good fine', 'bad awful', 'plain meh'][i % 3]} {i},{['pos', 'neg', 'neutral'][i % 3]}\n" for i in range(90)))
    done = autopeft_here("search", "--trials", "1", "--model", str(tiny_bert), "--task", "three.csv", "--train-size",
                         "45", "--val-size", "21", "--test-size", "21", "--max-steps", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert autopeft_here("export", "--out", "out", "--with-weights", cwd=tmp_path).returncode == 0
    line = re.search(r"Load \(peft only\): `(.+?)`", (tmp_path / "out" / "README.md").read_text(), re.DOTALL).group(1)
    script = ("import sys\nsys.modules['autopeft'] = None\nimport torch\nfrom peft import PeftModel\n"
              "from transformers import AutoModelForSequenceClassification\nBASE, THIS_FOLDER = sys.argv[1:3]\n"
              f"model = {line}\nprint(model(input_ids=torch.tensor([[101, 2023, 102]])).logits.shape[-1])")
    plain = subprocess.run([sys.executable, "-c", script, str(tiny_bert), str(tmp_path / "out")], capture_output=True,
                           check=False, text=True, timeout=300)
    assert plain.returncode == 0 and plain.stdout.strip() == "3", plain.stderr[-2000:]


def test_train_reproduces_the_trial_and_out_is_safe(finished_study: Path) -> None:
    assert autopeft_here("export", "--study", "h", "--out", "out2", cwd=finished_study).returncode == 0
    refused = autopeft_here("export", "--study", "h", "--out", "out2", cwd=finished_study)
    assert refused.returncode == 2 and "is not empty" in refused.stderr
    metrics = json.loads((finished_study / "out2" / "metrics.json").read_text())
    trained = autopeft("train", "--config", "out2/training.yaml", "--out", "again", cwd=finished_study)
    assert trained.returncode == 0, trained.stderr
    reproduced = float(trained.stdout.split("val accuracy ")[1].split(",")[0])
    assert abs(reproduced - metrics["val_accuracy"]) <= 0.01
    assert (finished_study / "again" / "adapter_config.json").is_file()
    other = autopeft("train", "--config", "out2/training.yaml", "--out", "other-seed", "--seed", "7", cwd=finished_study)
    assert other.returncode == 0, other.stderr
    from safetensors.torch import load_file

    same, moved = (load_file(next((finished_study / folder).glob("adapter_model.*")))
                   for folder in ("again", "other-seed"))
    assert same.keys() == moved.keys()
    assert any(not torch.equal(same[name], moved[name]) for name in same)  # another seed: other initial weights


def test_a_training_run_that_fails_is_one_line_and_leaves_no_empty_folder(
        finished_study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe whose run fails (a non-finite loss, an AdaLoRA schedule with no step to score ranks) printed a
    traceback, left an empty --out folder and its MLflow run RUNNING."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from autopeft import training_run
    from autopeft.cli import app
    from autopeft.errors import TrialFailed

    assert autopeft_here("export", "--study", "h", "--out", "out-fails", cwd=finished_study).returncode == 0

    monkeypatch.chdir(finished_study)
    (finished_study / "users-empty-folder").mkdir()
    client = MlflowClient(tracking_uri=f"sqlite:///{finished_study / 'mlflow.db'}")
    for error, reason in ((TrialFailed("non-finite loss at step 2"), "non-finite loss at step 2"),
                          (RuntimeError("CUDA error: device-side assert"), "RuntimeError: CUDA error: device-side assert")):
        def fails(*args: object, error: BaseException = error, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(training_run, "run_trial", fails)
        for out in ("failed-run", "users-empty-folder"):
            done = CliRunner().invoke(app, ["train", "--config", "out-fails/training.yaml", "--out", out])
            assert done.exit_code == 1 and f"error: training failed: {reason}" in done.output, done.output
            assert len(done.output.strip().splitlines()) == 1
            runs = [r for r in client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])
                    if r.data.tags.get("autopeft.reason") == reason]
            assert runs and all(r.info.status == "FAILED" for r in runs)
    assert not (finished_study / "failed-run").exists() and (finished_study / "users-empty-folder").is_dir()


def test_a_training_run_stopped_while_it_logs_is_not_left_running(finished_study: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only training was guarded: a Ctrl-C once the adapter was saved, while its curves were logged, left the
    run RUNNING."""
    from mlflow.tracking import MlflowClient

    from autopeft.tracking import Tracker
    from autopeft.training_run import train_from_recipe

    assert autopeft_here("export", "--study", "h", "--out", "out-stopped", cwd=finished_study).returncode == 0

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Tracker, "log_curve", ctrl_c)
    store = f"sqlite:///{finished_study / 'stopped.db'}"
    with pytest.raises(KeyboardInterrupt):
        train_from_recipe(finished_study / "out-stopped" / "training.yaml", finished_study / "stopped", tracking_uri=store)
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]


def test_an_adapter_another_configuration_left_at_the_trials_path_is_not_taken_for_it(
        finished_study: Path, tmp_path: Path) -> None:
    """A study replaced by --force-new reuses trial numbers: on a machine where the new trial did not run, the old
    trial's adapter lies at the path the new one recorded, and export took it for the trial's."""
    from autopeft.export import _trained_by

    study = optuna.load_study(study_name="h", storage=f"sqlite:///{finished_study / 'autopeft.db'}")
    trial = next(t for t in study.trials if t.state.name == "COMPLETE")
    kept = Path(trial.user_attrs["adapter_dir"])
    assert _trained_by(kept, trial)
    other = shutil.copytree(kept, tmp_path / "left-by-another-study")
    recipe = (other / "training.yaml").read_text()
    (other / "training.yaml").write_text(recipe.replace(f"\nseed: {trial.user_attrs['seed']}\n", "\nseed: 12345\n"))
    assert not _trained_by(other, trial)


def test_a_recipe_keeps_how_the_task_is_read_and_scored(tmp_path: Path) -> None:
    """training.yaml once held only the model, data sizes and training settings: `autopeft train` rebuilt a
    causal-LM trial as a classifier and looked for a file's rows in the default columns."""
    from autopeft.config import SearchConfig
    from autopeft.recipe import read_recipe, write_recipe
    from autopeft.space import TrialParams

    task = {"text_column": "review", "label_column": "verdict", "text_pair_column": "title",
            "task_type": "causal_lm", "label_words": ("bad", "good"), "template": "{text} / {text_pair} Verdict:",
            "causal_eval": "generate", "ood_task": "other.csv", "ood_text_column": "sentence",
            "ood_label_column": "sentiment", "ood_text_pair_column": "context", "probes": ("perplexity", "factual_recall")}
    config = SearchConfig(model="m", task="reviews.csv", trust_remote_code=True, **task)  # type: ignore[arg-type]
    write_recipe(tmp_path / "training.yaml", config, TrialParams("ia3", {"target_modules": "kv"}, {}), seed=3)
    read, _, seed = read_recipe(tmp_path / "training.yaml")
    assert {key: getattr(read, key) for key in task} == task and seed == 3
    assert not read.trust_remote_code  # only the person running the recipe turns it on
    assert read_recipe(tmp_path / "training.yaml", trust_remote_code=True)[0].trust_remote_code


def test_a_trials_recipe_names_local_paths_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each trial's training.yaml kept `--model ../tiny-bert` as typed: `autopeft train` from another folder
    looked for the model beside itself."""
    from autopeft.config import SearchConfig
    from autopeft.recipe import write_recipe
    from autopeft.space import TrialParams

    for name in ("model", "reviews.csv", "other.csv"):
        (tmp_path / name).touch()
    monkeypatch.chdir(tmp_path)
    config = SearchConfig(model="model", task="./reviews.csv", ood_task="other.csv")
    write_recipe(tmp_path / "training.yaml", config, TrialParams("ia3", {"target_modules": "kv"}, {}), seed=3)
    recipe = yaml.safe_load((tmp_path / "training.yaml").read_text())
    assert [recipe[key] for key in ("model", "task", "ood_task")] == [
        str(tmp_path / "model"), str(tmp_path / "reviews.csv"), str(tmp_path / "other.csv")]


def test_a_recipe_edited_to_hold_a_key_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    from autopeft.config import SearchConfig
    from autopeft.errors import ConfigError
    from autopeft.recipe import read_recipe, write_recipe
    from autopeft.space import TrialParams

    recipe = tmp_path / "training.yaml"
    write_recipe(recipe, SearchConfig(model="m"), TrialParams("ia3", {"target_modules": "kv"}, {}), seed=3)
    lines = recipe.read_text().splitlines()
    seed_line = next(i for i, line in enumerate(lines) if line.startswith("seed:")) + 1
    recipe.write_text(recipe.read_text() + "seed: 4\n")  # PyYAML alone would train with seed 4, silently
    with pytest.raises(ConfigError, match=rf"--config: {recipe} is not valid YAML at line {len(lines) + 1}, column 1: "
                                          rf"'seed' is given twice in one mapping \(lines {seed_line} and {len(lines) + 1}\)"):
        read_recipe(recipe)


def test_train_reproduces_a_causal_lm_trial_on_the_users_columns(tmp_path: Path,
                                                                 tiny_causal_models: dict[str, Path]) -> None:
    rows = "".join(f"a review number {i},{'good' if i % 2 else 'bad'}\n" for i in range(60))
    (tmp_path / "reviews.csv").write_text("review,verdict\n" + rows)
    done = autopeft_here("search", "--trials", "1", "--model", str(tiny_causal_models["llama"]), "--task", "reviews.csv",
                         "--text-column", "review", "--label-column", "verdict", "--task-type", "causal_lm",
                         "--train-size", "30", "--val-size", "14", "--test-size", "14", "--max-steps", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert autopeft_here("export", "--out", "out", cwd=tmp_path).returncode == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    trained = autopeft("train", "--config", "out/training.yaml", "--out", "again", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    reproduced = float(trained.stdout.split("val accuracy ")[1].split(",")[0])
    assert reproduced == pytest.approx(metrics["val_accuracy"], abs=1e-6)


def test_confirmation_retrains_the_leading_candidates_and_exports_the_best_mean(finished_study: Path) -> None:
    done = autopeft_here("export", "--study", "h", "--out", "out4", "--select", "max-accuracy-under-forgetting=1.0",
                         "--confirm-seeds", "1", "--confirm-top", "2", cwd=finished_study)
    assert done.returncode == 0, done.stderr
    assert "confirmation" in done.stdout
    metrics = json.loads((finished_study / "out4" / "metrics.json").read_text())
    confirmed = metrics["confirmation"]
    assert sorted(c["trial"] for c in confirmed) == [0, 1] and all(len(c["runs"]) == 2 for c in confirmed)
    assert all(c["runs"][0][0] != c["runs"][1][0] for c in confirmed)  # a new seed, not the trial's own again
    best = max(confirmed, key=lambda c: (c["val_accuracy_mean"], -c["forgetting_mean"]))
    assert metrics["trial"] == best["trial"] and "mean of 2 runs" in metrics["chosen_by"]
    assert "validation accuracy over 2 seeds" in (finished_study / "out4" / "README.md").read_text()
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="h", storage=f"sqlite:///{finished_study / 'autopeft.db'}")
    run_id = next(t for t in study.trials if t.number == best["trial"]).user_attrs["mlflow_run_id"]
    logged = MlflowClient(f"sqlite:///{finished_study / 'mlflow.db'}").get_run(run_id).data.metrics
    assert logged["confirmed_val_accuracy_mean"] == pytest.approx(best["val_accuracy_mean"])


def test_bad_confirmation_options_are_refused_before_any_work(finished_study: Path) -> None:
    done = autopeft_here("export", "--study", "h", "--out", "out5", "--confirm-top", "0", "--confirm-seeds", "1",
                         cwd=finished_study)
    assert done.returncode == 2 and "--confirm-top: 0 must be at least 1" in done.stderr
    assert not (finished_study / "out5").exists()


def test_a_trial_whose_adapter_was_not_kept_is_retrained_for_export(finished_study: Path, tmp_path: Path) -> None:
    kept, hidden = finished_study / "autopeft-artifacts", tmp_path / "hidden-artifacts"
    shutil.move(kept, hidden)
    try:
        done = autopeft_here("export", "--study", "h", "--out", "out3", "--with-weights",
                             "--select", "max-accuracy-under-forgetting=1.0", cwd=finished_study)
    finally:
        shutil.move(hidden, kept)
    assert done.returncode == 0, done.stderr
    assert "retrained it with its seed" in done.stdout
    assert any(p.name.startswith("adapter_model.") for p in (finished_study / "out3").iterdir())
    assert json.loads((finished_study / "out3" / "metrics.json").read_text())["retrained_for_export"] is True


def test_an_export_whose_retrain_fails_is_one_line_and_leaves_the_earlier_export_whole(
        finished_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retraining a trial whose adapter was not kept here can fail (no bitsandbytes for adamw_8bit, out of
    memory): export printed a traceback and left an empty --out folder behind."""
    from typer.testing import CliRunner

    from autopeft import search
    from autopeft.cli import app
    from autopeft.errors import TrialFailed

    assert autopeft_here("export", "--study", "h", "--out", "earlier", cwd=finished_study).returncode == 0
    earlier = {p.name: p.read_bytes() for p in (finished_study / "earlier").iterdir()}

    def fails(*args: object, **kwargs: object) -> None:
        raise TrialFailed("unsupported optimizer: adamw_8bit needs the bitsandbytes package")

    monkeypatch.setattr(search, "run_trial", fails)
    monkeypatch.chdir(finished_study)
    kept, hidden = finished_study / "autopeft-artifacts", tmp_path / "hidden-artifacts"
    shutil.move(kept, hidden)
    try:
        for out, force in (("new-folder", []), ("earlier", ["--force"])):
            done = CliRunner().invoke(app, ["export", "--study", "h", "--out", out, *force])
            assert done.exit_code == 1, done.output
            assert done.output.startswith("error: export failed: unsupported optimizer: adamw_8bit needs")
            assert len(done.output.strip().splitlines()) == 1, done.output
    finally:
        shutil.move(hidden, kept)
    assert not (finished_study / "new-folder").exists()
    assert {p.name: p.read_bytes() for p in (finished_study / "earlier").iterdir()} == earlier
