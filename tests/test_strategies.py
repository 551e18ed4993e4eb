"""Search strategies end to end in tiny studies: every sampler, scalar mode with every pruner, a third
objective, the training-step budget and the warm start. The model and data load once for the module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from autopeft import study as studies
from autopeft.config import SearchConfig
from autopeft.errors import ConfigError
from autopeft.export import select_trial
from autopeft.search import Runtime, SearchSummary, prepare_runtime, run_search, run_trials
from autopeft.space import load_space
from tests.tests_support import tiny_config

GRID_SPACE = """\
method: [lora, ia3]
training:
  learning_rate: [1.0e-3, 1.0e-2]
  micro_batch_size: 8
methods:
  lora:
    r: [2, 4]
"""


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Runtime:
    folder = tmp_path_factory.mktemp("strategies")
    config = tiny_config(folder, tiny_bert)
    return prepare_runtime(config, load_space(config.space))


def search(runtime: Runtime, tmp_path: Path, **overrides: object) -> optuna.Study:
    """A fresh study with these settings on the shared model and data."""
    return summarized_search(runtime, tmp_path, **overrides).study


def summarized_search(runtime: Runtime, tmp_path: Path, **overrides: object) -> SearchSummary:
    """The study (new, or resumed when tmp_path holds it) and why it stopped."""
    config = dataclasses.replace(runtime.config, storage=f"sqlite:///{tmp_path}/o.db",
                                 tracking_uri=f"sqlite:///{tmp_path}/m.db", artifacts_dir=str(tmp_path / "a"),
                                 **overrides)
    space = load_space(config.space)
    here = dataclasses.replace(runtime, config=config, space=space)
    on_stale = studies.StaleTrialRetry()
    return run_trials(here, studies.open_study(config, space, runtime.task, on_stale), on_stale)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_a_small_budget_is_not_silently_random_search(tmp_path: Path, tiny_bert: Path, sampler: str) -> None:
    """With Optuna's defaults the first 10 TPE trials (50 for NSGA-II) are random: a 9-trial search would be
    random search under another name. Here the model-based sampler takes over after a third of the budget."""
    config = tiny_config(tmp_path, tiny_bert, trials=9, sampler=sampler, objective_mode="scalar")
    assert studies.startup_trials(9) == 3

    def toy(trial: optuna.Trial) -> float:  # no model: only the sampler is under test
        return -sum((trial.suggest_float(name, 0.0, 1.0) - 0.8) ** 2 for name in "xyz")

    def drawn(kind: str) -> list[float]:
        study = optuna.create_study(direction="maximize")
        study.sampler = studies.seeded_sampler(dataclasses.replace(config, sampler=kind), study)
        study.optimize(toy, n_trials=9)
        return [tuple(t.params.values()) for t in study.trials]

    searched, random = drawn(sampler), drawn("random")
    assert searched[:3] == random[:3]  # the random start-up is the same seeded draw
    assert searched[3:] != random[3:]  # then the sampler models the results


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_each_sampler_runs_a_pareto_study(runtime: Runtime, tmp_path: Path, sampler: str) -> None:
    study = search(runtime, tmp_path, sampler=sampler, trials=2)
    assert type(study.sampler).__name__.lower().startswith(sampler if sampler != "nsga2" else "nsgaii")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2 and all(len(t.values) == 2 for t in complete)


def test_grid_sampler_walks_the_list_valued_space(runtime: Runtime, tmp_path: Path) -> None:
    (tmp_path / "grid.yaml").write_text(GRID_SPACE)
    study = search(runtime, tmp_path, sampler="grid", trials=3, space=str(tmp_path / "grid.yaml"))
    seen = {(t.params["method"], t.params["learning_rate"]) for t in study.trials if t.state.name == "COMPLETE"}
    assert len(seen) == 3  # no grid point twice


def test_grid_sampler_trains_each_configuration_once_and_says_when_the_grid_is_done(
        runtime: Runtime, tmp_path: Path) -> None:
    """8 grid points, 6 configurations: (IA)^3 has no r, so its points at r 2 and r 4 are one configuration."""
    (tmp_path / "grid.yaml").write_text(GRID_SPACE)
    summary = summarized_search(runtime, tmp_path, sampler="grid", trials=10, space=str(tmp_path / "grid.yaml"))
    complete = [t for t in summary.study.trials if t.state.name == "COMPLETE"]
    configurations = [tuple(sorted(t.user_attrs["params"].items())) for t in complete]
    assert len(configurations) == len(set(configurations)) == 6
    skipped = [t for t in summary.study.trials if "duplicate_of" in t.user_attrs]
    assert len(skipped) == 2 and all(t.state.name == "PRUNED" and t.params["method"] == "ia3" for t in skipped)
    assert summary.stopped_reason == "stopped with 6 of 10 trials completed: every configuration of the grid has been tried"


def test_a_resumed_walked_grid_trains_nothing_more(runtime: Runtime, tmp_path: Path) -> None:
    """Optuna's grid sampler draws a point again once the grid is walked: it ran as a repeat, under a wrong reason."""
    (tmp_path / "two.yaml").write_text("method: ia3\ntraining:\n  learning_rate: [1.0e-3, 1.0e-2]\n")
    first = summarized_search(runtime, tmp_path, sampler="grid", trials=3, space=str(tmp_path / "two.yaml"))
    again = summarized_search(runtime, tmp_path, sampler="grid", trials=3, space=str(tmp_path / "two.yaml"))
    assert [t.state.name for t in again.study.trials] == ["COMPLETE", "COMPLETE"]
    assert again.stopped_reason == first.stopped_reason == (
        "stopped with 2 of 3 trials completed: every configuration of the grid has been tried")


def test_a_resumed_grid_walks_every_point_it_had_not(runtime: Runtime, tmp_path: Path) -> None:
    """The grid sampler was seeded by the trial count: a resume shuffled the grid otherwise, so the points the
    first run recorded named other configurations, and some were never tried though the grid read as walked
    (the same with a second worker)."""
    (tmp_path / "grid.yaml").write_text("method: [lora, ia3]\ntraining:\n  learning_rate: [1.0e-3, 3.0e-3, 1.0e-2]\n"
                                        "  micro_batch_size: 8\nmethods:\n  lora:\n    r: [2, 4, 8]\n")
    summarized_search(runtime, tmp_path, sampler="grid", trials=4, space=str(tmp_path / "grid.yaml"))
    summary = summarized_search(runtime, tmp_path, sampler="grid", trials=20, space=str(tmp_path / "grid.yaml"))
    complete = [tuple(sorted(t.user_attrs["params"].items())) for t in summary.study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == len(set(complete)) == 12  # LoRA 3 x 3, (IA)^3 3
    assert summary.stopped_reason.endswith("every configuration of the grid has been tried")


def test_a_grid_configuration_that_failed_is_not_tried_again_for_another_methods_points(
        runtime: Runtime, tmp_path: Path) -> None:
    """A failing prompt-tuning point ran once per LoRA point (they differ only in LoRA's r), and the repeated
    failures ended the search with LoRA points untried."""
    (tmp_path / "grid.yaml").write_text("method: [lora, prompt]\ntraining:\n  micro_batch_size: 8\n"
                                        "  learning_rate: 1.0e-3\nmethods:\n  lora:\n    r: [2, 4, 8]\n"
                                        "  prompt:\n    num_virtual_tokens: 500\n")  # past the positions
    summary = summarized_search(runtime, tmp_path, sampler="grid", trials=6, space=str(tmp_path / "grid.yaml"),
                                max_consecutive_failures=2)
    failed = [t for t in summary.study.trials if t.state.name == "FAIL"]
    assert len(failed) == 1
    repeats = [t for t in summary.study.trials if t.user_attrs.get("duplicate_of") == failed[0].number]
    assert len(repeats) == 2 and all("which failed: " in t.user_attrs["prune_reason"] for t in repeats)


def test_a_resume_that_moves_the_study_to_another_store_says_so(runtime: Runtime, tmp_path: Path) -> None:
    """A resume with another --tracking-uri moved the study's parent run without a word; the runs so far stay in
    the store they were logged to."""
    study = search(runtime, tmp_path, trials=1)
    first_parent, first_store = study.user_attrs["mlflow_parent_run_id"], study.user_attrs["config"]["tracking_uri"]
    other = dataclasses.replace(runtime.config, storage=f"sqlite:///{tmp_path}/o.db", trials=2,
                                tracking_uri=f"sqlite:///{tmp_path}/other.db", artifacts_dir=str(tmp_path / "a"))
    assert studies.tracking_change(other) == (
        f"--tracking-uri sqlite:///{tmp_path}/other.db: the study logged to {first_store} until now, and its runs so "
        "far stay there; its parent run, this run's trials, report and export use the new store from here on")
    assert studies.tracking_change(dataclasses.replace(other, tracking_uri=first_store)) is None
    on_stale = studies.StaleTrialRetry()
    here = dataclasses.replace(runtime, config=other, space=load_space(other.space))
    resumed = run_trials(here, studies.open_study(other, here.space, runtime.task, on_stale), on_stale).study
    assert resumed.user_attrs["config"]["tracking_uri"] == f"sqlite:///{tmp_path}/other.db"
    assert resumed.user_attrs["mlflow_parent_run_id"] != first_parent  # a parent of its own in the new store


def test_grid_sampler_refuses_a_continuous_range_before_writing_a_study(runtime: Runtime, tmp_path: Path) -> None:
    config = dataclasses.replace(runtime.config, storage=f"sqlite:///{tmp_path}/o.db", sampler="grid")
    with pytest.raises(ConfigError, match="learning_rate is a continuous range"):
        run_search(config)
    assert not (tmp_path / "o.db").exists()


@pytest.mark.parametrize("pruner", ["hyperband", "successive-halving", "median", "none"])
def test_scalar_mode_with_each_pruner(runtime: Runtime, tmp_path: Path, pruner: str) -> None:
    study = search(runtime, tmp_path, objective_mode="scalar", pruner=pruner, forgetting_weight=0.5,
                   trials=2, max_steps=8)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete and all(len(t.values) == 1 for t in complete)
    for trial in complete:  # the scalar is what was stated
        assert trial.values[0] == pytest.approx(trial.user_attrs["val_accuracy"] - 0.5 * trial.user_attrs["forgetting"])
        if pruner != "none":  # reported from half the steps on, where the pruner can decide
            assert sorted(trial.intermediate_values) == {"median": [4, 6]}.get(pruner, [4])
    # export's and the summary's default pick is the study's own objective
    assert select_trial(study) == max(complete, key=lambda t: t.values[0])
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    logged = {int(r.data.tags["optuna.trial_number"]): r.data.metrics.get("scalar_objective")
              for r in client.search_runs([client.get_experiment_by_name("autopeft").experiment_id])
              if r.data.tags.get("autopeft.state") == "COMPLETE"}
    assert logged == {t.number: pytest.approx(t.values[0]) for t in complete}  # on the dashboard, to sort by


def test_prune_after_moves_the_first_rung_and_reports_at_every_rung(runtime: Runtime, tmp_path: Path) -> None:
    study = search(runtime, tmp_path, objective_mode="scalar", pruner="hyperband", prune_after=1, trials=2,
                   max_steps=12)
    for trial in study.trials:  # rungs at 1, 3 and 9 steps (x3 each), below the 12 a trial trains
        reported = sorted(trial.intermediate_values)
        assert reported and reported == [1, 3, 9][:len(reported)]
        assert len(reported) == 3 or trial.state.name == "PRUNED"
    # Each run holds the scores the pruner compared, a pruned run too (it logged none before)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    for trial in study.trials:
        history = client.get_metric_history(trial.user_attrs["mlflow_run_id"], "val_score_intermediate")
        assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)


@pytest.mark.parametrize(("prune_after", "pruned_at_step_1"), [(1, True), (None, False)])
def test_the_pruner_decides_from_prune_after_on(prune_after: int | None, pruned_at_step_1: bool) -> None:
    config = SearchConfig(objective_mode="scalar", pruner="successive-halving", max_steps=12, prune_after=prune_after)
    study = optuna.create_study(direction="maximize", pruner=studies.make_pruner(config))
    for value in (0.9, 0.8, 0.7):  # three trials that were better at step 1 (the pruner records them on asking)
        trial = study.ask()
        trial.report(value, 1)
        trial.should_prune()
        study.tell(trial, value)
    worse = study.ask()
    worse.report(0.1, 1)
    assert worse.should_prune() is pruned_at_step_1


def test_hyperband_prunes_a_hopeless_trial_and_says_why(runtime: Runtime, tmp_path: Path) -> None:
    study = search(runtime, tmp_path, objective_mode="scalar", pruner="median", trials=6, max_steps=8)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    for trial in pruned:
        assert trial.user_attrs["prune_reason"].startswith("pruned by median at step")
        assert trial.user_attrs["steps_trained"] < 8


def test_a_third_objective_and_the_step_budget(runtime: Runtime, tmp_path: Path) -> None:
    study = search(runtime, tmp_path, objectives=("accuracy", "forgetting", "trainable_params"), trials=5,
                   max_total_steps=7)  # 3 steps per trial: a third would overspend it
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 2
    assert all(t.values[2] == t.user_attrs["trainable_params"] for t in complete)
    assert study.directions[2] == optuna.study.StudyDirection.MINIMIZE
    resumed = summarized_search(runtime, tmp_path, objectives=("accuracy", "forgetting", "trainable_params"),
                                trials=5, max_total_steps=7)
    assert len(resumed.study.trials) == len(study.trials)  # a spent budget trains nothing more
    assert resumed.stopped_reason == ("stopped at the training-step budget: 6 of 7 steps spent (too few left for another "
                                      "3-step trial)")


def test_memory_as_an_objective_is_each_configurations_traced_peak(runtime: Runtime, tmp_path: Path) -> None:
    """Without a budget the objective was the analytic estimate, which gives every method the same activations:
    prompt tuning's 60 extra positions per row ranked lightest."""
    (tmp_path / "space.yaml").write_text("method: [lora, prompt]\ntraining:\n  learning_rate: 1.0e-3\n"
                                         "methods:\n  lora:\n    r: 4\n  prompt:\n    num_virtual_tokens: 60\n")
    study = search(runtime, tmp_path, objectives=("accuracy", "forgetting", "memory"), sampler="grid", trials=2,
                   space=str(tmp_path / "space.yaml"))
    peak = {t.params["method"]: t.values[2] for t in study.trials if t.state.name == "COMPLETE"}
    assert all(t.user_attrs["memory_estimate"]["level"] == "traced" for t in study.trials)
    assert peak["prompt"] > peak["lora"]


def test_a_timeout_that_ends_the_search_says_so(runtime: Runtime, tmp_path: Path) -> None:
    summary = summarized_search(runtime, tmp_path, trials=50, timeout=0.01)
    assert summary.stopped_reason.startswith("stopped at --timeout 0.01 s with 1 of 50 trials completed")


def test_warm_start_tries_the_default_lora_recipe_first(runtime: Runtime, tmp_path: Path) -> None:
    study = search(runtime, tmp_path, warm_start=True, trials=1)
    first = study.trials[0]
    assert first.user_attrs["warm_start"] == "default LoRA recipe, but for learning_rate 0.0002 (outside the space: sampled)"
    # What the test space can express of the recipe is used; its lr 2e-4 is outside this space's range.
    assert (first.params["method"], first.params["lora.r"], first.params["lora.alpha"],
            first.params["lora.target_modules"]) == ("lora", 8, 16.0, "qv")


def test_warm_start_names_every_recipe_value_the_space_does_not_search(runtime: Runtime, tmp_path: Path) -> None:
    """A space that fixes a recipe setting to another value, or leaves one out (the default is then trained),
    runs the recipe with that value: the label said "default LoRA recipe" all the same."""
    space = tmp_path / "fixed.yaml"
    space.write_text("method: [lora, ia3]\ntraining:\n  micro_batch_size: 8\nmethods:\n  lora:\n    r: 4\n"
                     "    alpha: [8, 16]\n")
    first = search(runtime, tmp_path, warm_start=True, trials=1, space=str(space)).trials[0]
    assert first.user_attrs["warm_start"] == ("default LoRA recipe, but for lora.r 4 instead of 8, "
                                              "learning_rate 0.001 instead of 0.0002 (not searched by the space)")
    assert (first.params["method"], first.params["lora.alpha"]) == ("lora", 16)


def test_warm_start_samples_recipe_values_off_a_stepped_ranges_steps(tmp_path: Path) -> None:
    """r 8 on 4, 12, 20, 28 is inside the range but not a value it can take: the trial trained it anyway (Optuna
    warned) and was labelled the plain recipe."""
    from autopeft.search import warm_start

    space = tmp_path / "stepped.yaml"
    space.write_text("method: lora\ntraining:\n  learning_rate: {low: 1.0e-4, high: 1.0e-3, step: 3.0e-4}\n"
                     "methods:\n  lora:\n    r: {low: 4, high: 28, step: 8}\n    alpha: {low: 4, high: 28, step: 6}\n"
                     "    target_modules: [qv, attention]\n")
    study = optuna.create_study(directions=["maximize", "minimize"])
    warm_start(study, load_space(space))
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))[0]
    assert queued.user_attrs["warm_start"].startswith(
        "default LoRA recipe, but for lora.r 8, learning_rate 0.0002 (outside the space: sampled)")
    assert queued.system_attrs["fixed_params"] == {"lora.alpha": 16, "lora.target_modules": "qv"}


def test_warm_start_on_a_space_without_lora_is_refused_before_anything_loads(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was silently ignored: the search ran without the recipe it promised not to end below."""
    from autopeft import search
    from autopeft.search import run_search

    def loads(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model and data were loaded before the refusal")

    monkeypatch.setattr(search, "prepare_runtime", loads)
    space = tmp_path / "ia3.yaml"
    space.write_text("method: ia3\ntraining:\n  learning_rate: [1.0e-3, 1.0e-2]\n")
    config = tiny_config(tmp_path, tiny_bert, space=str(space), warm_start=True)
    with pytest.raises(ConfigError) as refused:
        run_search(config)
    assert str(refused.value) == (f"--warm-start: the default recipe is LoRA, and {space} searches ia3 only; add "
                                  "lora to its methods, or drop --warm-start")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ia3.yaml", "space.yaml"]  # no study, run or folder


def test_warm_start_on_a_resumed_study_that_never_had_it_tries_the_recipe_once(runtime: Runtime,
                                                                                 tmp_path: Path) -> None:
    search(runtime, tmp_path, trials=1)
    held = search(runtime, tmp_path, warm_start=True, trials=1)  # holds its trials: the recipe was left waiting
    assert [t.state.name for t in held.trials] == ["COMPLETE"]
    search(runtime, tmp_path, warm_start=True, trials=2)
    study = search(runtime, tmp_path, warm_start=True, trials=3)
    assert ["warm_start" in t.user_attrs for t in study.trials] == [False, True, False]


def test_warm_start_on_a_study_whose_step_budget_is_spent_leaves_nothing_waiting(runtime: Runtime,
                                                                                  tmp_path: Path) -> None:
    search(runtime, tmp_path, trials=3, max_total_steps=3)  # 3 steps a trial: one fits
    study = search(runtime, tmp_path, warm_start=True, trials=3, max_total_steps=3)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"objectives": ("accuracy", "speed")}, "--objectives"),
    ({"pruner": "hyperband"}, "needs --objective-mode scalar"),
    ({"sampler": "cmaes"}, "--sampler"),
    ({"objective_mode": "weighted"}, "--objective-mode"),
    ({"max_total_steps": 0}, "--max-total-steps"),
    ({"prune_after": 10}, "--prune-after: needs a --pruner"),
    ({"objective_mode": "scalar", "objectives": ("accuracy", "forgetting", "memory")},
     "a third objective \\(memory\\) needs --objective-mode pareto"),
    ({"sampler": "grid", "warm_start": True}, "--warm-start: not with --sampler grid"),
    ({"objective_mode": "scalar", "pruner": "hyperband", "max_steps": 60, "prune_after": 60},
     "--prune-after: 60 must be at least 1 and below --max-steps \\(60\\)")])
def test_bad_strategy_options_are_one_clear_line(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SearchConfig(**overrides)  # type: ignore[arg-type]


def test_the_pruners_slice_holds_every_class_of_a_validation_file_ordered_by_label(
        runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mid-training score read the first validation rows: of a file ordered by label (many ship so), one
    class, and the pruner ranked trials by how often they predicted it."""
    from autopeft import search as search_module
    from autopeft.search import run_trial
    from autopeft.space import TrialParams

    labels = [int(label) for label in runtime.validation.labels]
    ordered = runtime.validation.subset(sorted(range(len(labels)), key=labels.__getitem__))
    seen: list[list[int]] = []

    class Recording:  # the runtime's evaluator, noting the classes of each slice the pruner's score reads
        def __getattr__(self, name: str) -> object:
            return getattr(runtime.evaluate, name)

        def __call__(self, *args: object, **kwargs: object) -> object:
            return runtime.evaluate(*args, **kwargs)

        def progress(self, model: object, split: object, device: object) -> object:
            seen.append(sorted({int(label) for label in split.labels}))
            return runtime.evaluate.progress(model, split, device)

    monkeypatch.setattr(search_module, "INTERMEDIATE_ROWS", 8)
    here = dataclasses.replace(runtime, validation=ordered, evaluate=Recording())
    params = TrialParams("ia3", {"target_modules": "kv"}, {"learning_rate": 1e-2, "micro_batch_size": 8})
    run_trial(here, params, seed=0)
    assert seen == [sorted(set(labels))] and len(set(labels)) > 1


def test_a_walked_grid_names_the_points_the_memory_budget_rejected() -> None:
    """Optuna's grid counts a point the budget rejected as tried, so a resume under a looser budget trained nothing
    and said every configuration had been tried: the points it will not draw again are now counted, with the way to
    try them."""
    from autopeft.stopping import SearchStops

    study = optuna.create_study(directions=["maximize", "minimize"])
    for rate in (1e-3, 1e-2):  # two rejected points, one of them twice (another worker's draw)
        for _ in range(1 + (rate == 1e-2)):
            study.enqueue_trial({"learning_rate": rate})
            trial = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
            trial.set_constraint("memory", 1024.0)  # as the budget gate records it: its estimate above the budget
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    stops = SearchStops(SearchConfig(sampler="grid", trials=3), study, since=0.0)
    assert stops.reason(study) == (
        "stopped with 0 of 3 trials completed: every configuration of the grid has been tried (2 of them rejected by "
        "the memory budget, which Optuna's grid does not draw again; a new study (--force-new) tries them under this "
        "budget)")
