"""Does the search beat the alternatives? Samplers, pruning and the default recipe at an equal budget.

Each part runs over seeds 0..N-1 (the seed sets the data split, the sampler and every trial's training):

  quality  On MiniLM + Rotten Tomatoes, the default space (LoRA or IA3, their own settings, learning rate,
           optimizer, accumulation) with an equal budget of trials and steps: TPE and NSGA-II (Pareto on
           accuracy and forgetting) against random search and against the default LoRA recipe (r 8, alpha 16,
           lr 2e-4, attention targets). Per study: best validation accuracy, the Pareto front's hypervolume,
           the test accuracy and forgetting of the configuration `autopeft export` picks (its default rule,
           `balanced`, and `best-accuracy`), read from the trial's saved adapter, its measured peak memory,
           and the trial at which the sampler first reached random search's final best. Also TPE on
           accuracy alone (scalar mode, forgetting weight 0, `tpe-accuracy`).
  pruning  Scalar mode with forgetting weight 0 (the objective is validation accuracy, the quantity the
           target is in), TPE, the same wall-clock allowance with and without the hyperband pruner: seconds
           until a trial reaches random search's final best (from `quality`).
  causal   The causal-LM path on the packaged SmolLM2-135M (answer label words, loss on them only), smaller:
           TPE and random against the default recipe.
  bounded  quality's searches held to the default recipe's own costs, as a user who wants "better than the
           recipe, at no extra cost" runs them: the recipe is trained first, every strategy searches under a
           memory budget of its measured peak (`--memory-budget`), and the export is the most accurate trial
           at no more forgetting than the recipe's (`--select max-accuracy-under-forgetting=F`).
  causal-bounded  the same for causal's searches.
  causal-bounded-larger  causal-bounded with twice the steps (16) and three times the evaluation rows (300
           validation, 600 test): are its margins over the recipe more than the noise of 100 / 200 rows?
  causal-bounded-longer  causal-bounded-larger with twice the trials (8) and twice the steps again (32): does the
           recipe, given steps to learn, leave room below its costs, and does TPE, given guided trials (2 random
           start-up trials of 8), reach random search's best within half of them?
  causal-bounded-all-methods  causal-bounded-longer on a space with the project's other methods too (DoRA,
           AdaLoRA, MoRA, bottleneck adapters, prefix and prompt tuning; causal_all_methods.yaml): is there a
           configuration more accurate than the recipe at no more forgetting and memory off LoRA and (IA)^3?
  causal-bounded-warm  causal-bounded-longer with `--warm-start` in both searches: the recipe is each search's
           first trial (one of its 8). Does TPE, modelling from a known-good configuration, find one more
           accurate at its costs than random search does from the same start?
  longer   quality with twice the trials (20), TPE on accuracy alone against random search: does a model-based
           sampler with more trials to learn from reach random search's final best in half of them?
  pruning-long  pruning on trials long enough for it to pay: 240 steps, the first rung at 30 (an eighth), where
           the 60-step part's first signal was. Random search (10 trials) sets the target, its final best; the
           same random draws then run under hyperband until one reaches it (or the time random search took
           runs out). The two arms train the same configurations in the same order, so the ratio of their
           seconds to the target is the pruner's alone. "hyperband whole search" runs the whole search instead:
           as many draws as random search, each pruned or not (its seconds and best against random search's).

Run:  .venv/bin/python experiments/search/bench.py --part PART [--seeds 3] [--only a,b]
      (PART: quality, pruning, pruning-long, causal, bounded, longer, causal-bounded, causal-bounded-larger,
       causal-bounded-longer, causal-bounded-all-methods, causal-bounded-warm)
      (--only runs those strategies and adds them to the part's recorded seeds.)
      (--smoke runs each part on a tiny random model in seconds, to check the script.)
      (--render-only re-renders results.md from results.json and runs nothing.)
Each part merges its rows into results.json and re-renders results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import optuna

from autopeft import memory, methods
from autopeft.config import SearchConfig
from autopeft.errors import StudyError
from autopeft.export import select_trial
from autopeft.search import build_model, load_trained, prepare_runtime, run_search, run_trial, train_settings
from autopeft.space import TRAINING_PARAMS, TrialParams
from autopeft.study import pareto_front, pruner_checkpoints, rejected_by_budget, scores, startup_trials

HERE = Path(__file__).resolve().parent
optuna.logging.set_verbosity(optuna.logging.WARNING)

# What each part searches. Equal budgets inside a part: the same trials x steps for every strategy.
PARTS = {
    "quality": {"model": "packaged:all-MiniLM-L6-v2", "trials": 10, "max_steps": 60, "train_size": 4000, "val_size": 500,
                    "test_size": 1000, "max_length": 64, "probes": ("linear_probe", "representation_drift")},
    "pruning": {"model": "packaged:all-MiniLM-L6-v2", "trials": 200, "max_steps": 60, "train_size": 4000, "val_size": 500,
                    "test_size": 1000, "max_length": 64, "probes": ("linear_probe", "representation_drift"), "objective_mode": "scalar",
                    "forgetting_weight": 0.0, "timeout": 300.0},
    "causal": {"model": "packaged:SmolLM2-135M-Instruct", "trials": 4, "max_steps": 8, "train_size": 1000, "val_size": 100,
                   "test_size": 200, "max_length": 48, "probes": ("perplexity",), "task_type": "causal_lm",
                   "space": str(HERE / "causal_space.yaml")},
}
PARTS["longer"] = dict(PARTS["quality"], trials=20)  # the same search with twice the trials
PARTS["pruning-long"] = dict(PARTS["quality"], max_steps=240, objective_mode="scalar", forgetting_weight=0.0)
# Each bounded part and the search it holds to the recipe's memory and forgetting (its settings, but for the
# larger one's steps and evaluation rows).
CAUSAL_BOUNDED = ("causal-bounded", "causal-bounded-larger", "causal-bounded-longer", "causal-bounded-all-methods",
                  "causal-bounded-warm")
BOUNDED = {"bounded": "quality", **{part: "causal" for part in CAUSAL_BOUNDED}}
PARTS.update({bounded: PARTS[held] for bounded, held in BOUNDED.items()})
PARTS["causal-bounded-larger"] = dict(PARTS["causal"], max_steps=16, val_size=300, test_size=600)
PARTS["causal-bounded-longer"] = dict(PARTS["causal-bounded-larger"], trials=8, max_steps=32)
PARTS["causal-bounded-all-methods"] = dict(PARTS["causal-bounded-longer"], space=str(HERE / "causal_all_methods.yaml"))
PARTS["causal-bounded-warm"] = PARTS["causal-bounded-longer"]
STRATEGIES = {
    "quality": {"tpe": {"sampler": "tpe"}, "nsga2": {"sampler": "nsga2"}, "random": {"sampler": "random"},
                # TPE on accuracy alone (scalar mode, forgetting weight 0): is a Pareto objective what keeps
                # TPE from reaching random search's best within half the trials? Random search draws the same
                # trials whatever the objective, so its results stay the reference.
                "tpe-accuracy": {"sampler": "tpe", "objective_mode": "scalar", "forgetting_weight": 0.0}},
    "pruning": {"hyperband": {"sampler": "tpe", "pruner": "hyperband"}, "no pruning": {"sampler": "tpe"}},
    "causal": {"tpe": {"sampler": "tpe"}, "random": {"sampler": "random"}},
}
STRATEGIES["bounded"] = {name: STRATEGIES["quality"][name] for name in ("tpe", "nsga2", "random")}
STRATEGIES.update({part: STRATEGIES["causal"] for part in CAUSAL_BOUNDED})
STRATEGIES["causal-bounded-warm"] = {name: dict(arm, warm_start=True) for name, arm in STRATEGIES["causal"].items()}
STRATEGIES["longer"] = {name: STRATEGIES["quality"][name] for name in ("tpe-accuracy", "random")}
# Hyperband's trial count is open: it runs until a trial reaches the target or random search's time runs out.
STRATEGIES["pruning-long"] = {"no pruning": {"sampler": "random"},
                              "hyperband": {"sampler": "random", "pruner": "hyperband", "trials": 200},
                              # The whole search: the same draws as "no pruning", as many, pruned or not.
                              "hyperband whole search": {"sampler": "random", "pruner": "hyperband", "trials": 200}}
# The recipe people start from (peft's documented LoRA defaults, as in the brief), at the same step budget.
DEFAULT_LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "attention", "use_rslora": False}
DEFAULT_TRAINING = {"learning_rate": 2e-4, "optimizer": "adamw"}
SMOKE = {"train_size": 120, "val_size": 60, "test_size": 60, "max_steps": 8, "trials": 3, "probes": None}


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by (accuracy up, forgetting down) points, against the reference accuracy 0, forgetting 1.
    Exact for two objectives: sweep accuracy from high to low, keeping the least forgetting seen so far."""
    area, least = 0.0, 1.0
    ordered = sorted(points, key=lambda p: -p[0])
    for index, (accuracy, forgetting) in enumerate(ordered):
        least = min(least, forgetting)
        lower = ordered[index + 1][0] if index + 1 < len(ordered) else 0.0
        area += (accuracy - lower) * (1.0 - least)
    return area


def base_config(part: str, seed: int, folder: Path, smoke_model: str | None) -> dict:
    spec = dict(PARTS[part])
    if smoke_model:
        spec.update(SMOKE, model=smoke_model, timeout=20.0 if part == "pruning" else None)
        spec = {k: v for k, v in spec.items() if v is not None}
    return dict(spec, seed=seed, storage=f"sqlite:///{folder}/autopeft.db",
                tracking_uri=f"sqlite:///{folder}/mlflow.db", artifacts_dir=str(folder / "artifacts"))


def trial_rows(study: optuna.Study, origin: float) -> list[dict]:
    rows = []
    for t in study.trials:
        row = {"number": t.number, "state": t.state.name, "params": t.user_attrs.get("params"),
               "steps_trained": t.user_attrs.get("steps_trained")}
        if t.datetime_complete is not None:
            row["seconds_from_start"] = t.datetime_complete.timestamp() - origin
        if t.state == optuna.trial.TrialState.COMPLETE:
            row["val_accuracy"], row["forgetting"] = scores(t)
        if rejected_by_budget(t):
            row["over_budget"] = True  # rejected before training: not one of the part's trials
        rows.append(row)
    return rows


def peak_bytes(runtime, params: TrialParams) -> int:
    """Live tensor bytes at the peak of one training step on a full-length batch (autopeft.memory.measure)."""
    return memory.measure(build_model(runtime, params), train_settings(params, max_steps=2, seed=0),
                          seq_len=runtime.longest_row, task_type=runtime.method_task_type,
                          num_labels=len(runtime.task.label_names), pad_id=runtime.pad_id,
                          after_step=methods.get(params.method).after_step)


def exported(runtime, study: optuna.Study, rule: str) -> dict:
    """Test accuracy, forgetting and peak memory of the trial `autopeft export --select RULE` picks."""
    trial = select_trial(study, rule)
    model = load_trained(runtime, Path(trial.user_attrs["adapter_dir"]))
    params = TrialParams.from_flat(trial.user_attrs["params"])
    return {"rule": rule, "trial": trial.number, "params": trial.user_attrs["params"],
            "val_accuracy": scores(trial)[0], "forgetting": scores(trial)[1],
            "drift": trial.user_attrs.get("probe.representation_drift"),  # logged beside the objective
            "test_accuracy": runtime.evaluate(model, runtime.test, runtime.device),
            "peak_bytes": peak_bytes(runtime, params)}


def recipe_params(runtime) -> TrialParams:
    """The default LoRA recipe at the part's micro-batch size."""
    batch = 4 if runtime.config.task_type == "causal_lm" else 16  # as the part's space
    training = {**{k: s.default for k, s in TRAINING_PARAMS.items()}, **DEFAULT_TRAINING, "micro_batch_size": batch}
    return TrialParams("lora", methods.get("lora").resolve(DEFAULT_LORA), training)


def default_recipe(runtime, seed: int) -> dict:
    params = recipe_params(runtime)
    began = time.perf_counter()
    outcome = run_trial(runtime, params, seed=seed)
    return {"val_accuracy": outcome.accuracy, "forgetting": outcome.forgetting,
            "drift": outcome.probe_scores.get("representation_drift"),
            "test_accuracy": runtime.evaluate(outcome.model, runtime.test, runtime.device),
            "peak_bytes": peak_bytes(runtime, params), "wall_seconds": time.perf_counter() - began,
            "trainable": outcome.trainable}


def run_strategy(part: str, name: str, seed: int, smoke_model: str | None, callback=None,
                 **limits) -> tuple[dict, SearchConfig, Path]:
    folder = Path(tempfile.mkdtemp(prefix=f"search-bench-{part}-"))
    config = SearchConfig(**{**base_config(part, seed, folder, smoke_model), **STRATEGIES[part][name], **limits},
                          study=f"{part}-{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}-{seed}")
    began = time.time()
    summary = run_search(config, progress=callback)
    wall = time.time() - began
    study = summary.study
    started = [t.datetime_start.timestamp() for t in study.trials if t.datetime_start]
    origin = min(started) if started else began  # the first trial's start: model loading is excluded
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"strategy": name, "seed": seed, "wall_seconds": wall, "trials": trial_rows(study, origin),
              "folder": str(folder),
              "best_val_accuracy": max((scores(t)[0] for t in done), default=None),
              "hypervolume": hypervolume([scores(t) for t in done]) if done else 0.0,
              "pareto_size": len(pareto_front(done))}
    return result, config, folder


def run_part(part: str, seeds: int, smoke_model: str | None, names: list[str], recipe: bool = True,
             recorded: dict | None = None) -> list[dict]:
    if part in BOUNDED:
        return [run_bounded(part, seed, smoke_model, names) for seed in range(seeds)]
    if part == "pruning-long":
        return [run_pruning_long(seed, smoke_model, names, (recorded or {}).get(seed)) for seed in range(seeds)]
    rows = []
    for seed in range(seeds):
        row: dict = {"part": part, "seed": seed, "strategies": {}}
        runtime = None  # the seed's model and split, loaded once for its exports and the default recipe
        for name in names:
            result, config, _ = run_strategy(part, name, seed, smoke_model)
            if part != "pruning":
                runtime = runtime or prepare_runtime(config)
                study = optuna.load_study(study_name=config.study, storage=config.storage)
                result["export"] = {rule: exported(runtime, study, rule) for rule in ("balanced", "best-accuracy")}
            row["strategies"][name] = result
            print(f"{part} seed {seed} {name}: best val {result['best_val_accuracy']} "
                  f"({result['wall_seconds']:.0f} s)", flush=True)
        if part == "pruning":  # the target its rendering compares against: this seed's quality run as it stands
            row["target"] = quality_target(seed)
        if runtime is not None and recipe:
            row["default_recipe"] = default_recipe(runtime, seed)
            print(f"{part} seed {seed} default recipe: {row['default_recipe']}", flush=True)
        rows.append(row)
    return rows


def quality_target(seed: int) -> float | None:
    """Random search's final best in the recorded quality part for this seed (pruning's target)."""
    path = HERE / "results.json"
    rows = json.loads(path.read_text())["parts"].get("quality", []) if path.exists() else []
    return next((r["strategies"]["random"]["best_val_accuracy"] for r in rows if r["seed"] == seed), None)


def run_bounded(part: str, seed: int, smoke_model: str | None, names: list[str]) -> dict:
    """The recipe first; then each strategy under a memory budget of the recipe's measured peak, exported at
    no more forgetting than the recipe's."""
    folder = Path(tempfile.mkdtemp(prefix=f"search-bench-{part}-recipe-"))
    runtime = prepare_runtime(SearchConfig(**base_config(part, seed, folder, smoke_model)))
    recipe = default_recipe(runtime, seed)
    print(f"{part} seed {seed} default recipe: {recipe}", flush=True)
    rule = f"max-accuracy-under-forgetting={recipe['forgetting']!r}"
    row: dict = {"part": part, "seed": seed, "strategies": {}, "default_recipe": recipe,
                 "memory_budget": recipe["peak_bytes"], "export_rule": rule}
    for name in names:
        result, config, _ = run_strategy(part, name, seed, smoke_model, memory_budget=recipe["peak_bytes"])
        study = optuna.load_study(study_name=config.study, storage=config.storage)
        result["export"] = {"balanced": exported(runtime, study, "balanced")}
        try:  # none may qualify: then the recipe itself is what a user keeps
            result["export"]["recipe-bound"] = exported(runtime, study, rule)
        except StudyError:
            result["export"]["recipe-bound"] = None
        row["strategies"][name] = result
        print(f"{part} seed {seed} {name}: best val {result['best_val_accuracy']} ({result['wall_seconds']:.0f} s)",
              flush=True)
    return row


def pruning_long_pruner(max_steps: int) -> SearchConfig:
    """pruning-long's hyperband settings: its first rung at an eighth of the steps (30 of 240)."""
    return SearchConfig(objective_mode="scalar", pruner="hyperband", max_steps=max_steps,
                        prune_after=max(1, max_steps // 8))


def pruning_long_rungs(max_steps: int) -> tuple[int, ...]:
    """Where pruning-long's hyperband decides: its first rung, then x3."""
    return pruner_checkpoints(pruning_long_pruner(max_steps))


def run_pruning_long(seed: int, smoke_model: str | None, names: list[str], recorded: dict | None) -> dict:
    """Random search sets the target; the same draws under hyperband then race to it ("hyperband"), or run
    to as many trials as random search's ("hyperband whole search"). With --only, the recorded run without
    pruning sets the target (its trials are seeded: a re-run repeats them)."""
    part = "pruning-long"
    if "no pruning" in names or recorded is None:
        unpruned, _, _ = run_strategy(part, "no pruning", seed, smoke_model)
    else:
        unpruned = recorded["strategies"]["no pruning"]
    target = unpruned["best_val_accuracy"]
    allowance = seconds_to_reach(unpruned, target)
    max_steps = base_config(part, seed, Path(tempfile.gettempdir()), smoke_model)["max_steps"]  # smoke: its own
    prune_after = pruning_long_pruner(max_steps).prune_after

    def stop_at_target(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE and scores(trial)[0] >= target - 1e-9:
            study.stop()

    def stop_after_the_same_draws(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) \
                >= len(trained_trials(unpruned)):
            study.stop()

    results = {"no pruning": unpruned}
    # optuna's timeout stops starting trials: one running at the deadline finishes, so a ratio above 1 shows.
    arms = {"hyperband": {"callback": stop_at_target, "timeout": allowance},
            "hyperband whole search": {"callback": stop_after_the_same_draws}}
    for name, limits in arms.items():
        if name in names:
            results[name], _, _ = run_strategy(part, name, seed, smoke_model, prune_after=prune_after, **limits)
    for name, result in results.items():
        print(f"{part} seed {seed} {name}: best val {result['best_val_accuracy']} ({result['wall_seconds']:.0f} s)",
              flush=True)
    return {"part": part, "seed": seed, "target": target, "strategies": results}


# ----------------------------------------------------------------------------------------------- analysis

def trained_trials(result: dict) -> list[dict]:
    """A strategy's trials in start order, failed and pruned included, rejected by a memory budget before
    training not (they train nothing and are not counted among the part's trials)."""
    return [t for t in sorted(result["trials"], key=lambda t: t["number"]) if not t.get("over_budget")]


def trials_to_reach(result: dict, target: float) -> int | None:
    """1-based count of trained trials until one reached `target`."""
    for count, trial in enumerate(trained_trials(result), start=1):
        if trial.get("val_accuracy") is not None and trial["val_accuracy"] >= target - 1e-9:
            return count
    return None


def seconds_to_reach(result: dict, target: float) -> float | None:
    times = [t["seconds_from_start"] for t in result["trials"]
             if t.get("val_accuracy") is not None and t["val_accuracy"] >= target - 1e-9]
    return min(times) if times else None


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f}"


def render_quality(part: str, rows: list[dict]) -> list[str]:
    spec = PARTS[part]
    names = [n for n in STRATEGIES[part] if all(n in r["strategies"] for r in rows)]  # those run on every seed
    lines = [(f"## {part}: {spec['model']}, {spec['trials']} trials x {spec['max_steps']} steps per strategy, "
             f"{spec['train_size']} train / {spec['val_size']} validation / {spec['test_size']} test rows, "
             f"seeds {', '.join(str(r['seed']) for r in rows)}"), "",
             ("Medians over seeds. 'export' is the trial `autopeft export` picks by default (balanced); its test "
             "accuracy is read from the trial's saved adapter. 'trials to random's best': the trial count at "
             "which the strategy first reached the same seed's random-search final best (— if never)."), "",
             ("| strategy | best val accuracy | hypervolume | export: val / test accuracy | export forgetting | "
             "export 1 - CKA | export peak MiB | best-accuracy trial: test accuracy / forgetting | trials to random's best | wall s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        results = [r["strategies"][name] for r in rows]
        balanced = [r["export"]["balanced"] for r in results]
        best = [r["export"]["best-accuracy"] for r in results]
        targets = [r["strategies"]["random"]["best_val_accuracy"] for r in rows]
        reach = [trials_to_reach(res, target) for res, target in zip(results, targets)]
        lines.append(
            f"| {name} | {fmt(median([r['best_val_accuracy'] for r in results]))} | "
            f"{fmt(median([r['hypervolume'] for r in results]))} | "
            f"{fmt(median([b['val_accuracy'] for b in balanced]))} / {fmt(median([b['test_accuracy'] for b in balanced]))} | "
            f"{fmt(median([b['forgetting'] for b in balanced]))} | {fmt(median([b.get('drift') for b in balanced]))} | "
            f"{mib(median([b['peak_bytes'] for b in balanced]))} | "
            f"{fmt(median([b['test_accuracy'] for b in best]))} / {fmt(median([b['forgetting'] for b in best]))} | "
            f"{reach} | {fmt(median([r['wall_seconds'] for r in results]), '.0f')} |")
    lines.append(recipe_row(rows, drift=True))
    lines += ["", "Per seed (best val accuracy per strategy; default recipe val / test):", ""]
    for r in rows:
        bests = ", ".join(f"{n} {fmt(r['strategies'][n]['best_val_accuracy'])}" for n in names)
        d = r["default_recipe"]
        lines.append(f"- seed {r['seed']}: {bests}; default recipe {fmt(d['val_accuracy'])} / {fmt(d['test_accuracy'])}")
    lines += halfway_lines(part, rows, names)
    lines += ["", ("Goal check per seed: does the exported (balanced) configuration beat the default recipe on test "
              "accuracy at no more forgetting and no more peak memory?"), ""]
    return lines + goal_checks(rows, names, "balanced") + [""]


def halfway_lines(part: str, rows: list[dict], names: list[str]) -> list[str]:
    """Per seed and strategy: the best validation accuracy after half the trials and after all of them, and
    the median over the trials after the model-based samplers' random start-up (the same trial numbers for
    every strategy), which says how good the configurations a sampler picks are, not only its luckiest."""
    trials = PARTS[part]["trials"]
    startup = startup_trials(trials)
    lines = ["", (f"Per seed: best validation accuracy after {trials // 2} / {trials} trials; median over trials "
             f"{startup + 1}-{trials} (after the {startup} random start-up trials):"), ""]
    for r in rows:
        cells = []
        for n in names:
            accuracy = [t.get("val_accuracy") for t in trained_trials(r["strategies"][n])]
            half = max((a for a in accuracy[:trials // 2] if a is not None), default=None)
            cells.append(f"{n} {fmt(half)} / {fmt(r['strategies'][n]['best_val_accuracy'])}; "
                         f"{fmt(median(accuracy[startup:]))}")
        lines.append(f"- seed {r['seed']}: " + " | ".join(cells))
    return lines


def recipe_row(rows: list[dict], *, drift: bool) -> str:
    """The default recipe's table row (medians over seeds); `drift`: with the 1 - CKA column."""
    recipe = [r["default_recipe"] for r in rows]
    cells = [fmt(median([d["val_accuracy"] for d in recipe])),
             fmt(median([hypervolume([(d["val_accuracy"], d["forgetting"])]) for d in recipe])),
             f"{fmt(median([d['val_accuracy'] for d in recipe]))} / {fmt(median([d['test_accuracy'] for d in recipe]))}",
             fmt(median([d["forgetting"] for d in recipe]))]
    cells += [fmt(median([d.get("drift") for d in recipe]))] if drift else []
    cells += [mib(median([d["peak_bytes"] for d in recipe])), "", "", fmt(median([d["wall_seconds"] for d in recipe]), ".0f")]
    return "| default LoRA recipe (one run) | " + " | ".join(cells) + " |"


def goal_checks(rows: list[dict], names: list[str], rule: str) -> list[str]:
    """Per seed and strategy: does the export by `rule` beat the recipe on test accuracy at no more forgetting
    and no more peak memory?"""
    lines = []
    for r in rows:
        d = r["default_recipe"]
        checks = []
        for n in names:
            b = r["strategies"][n]["export"][rule]
            if b is None:
                checks.append(f"{n} —")
                continue
            holds = b["test_accuracy"] > d["test_accuracy"] and b["forgetting"] <= d["forgetting"] and \
                b["peak_bytes"] <= d["peak_bytes"]
            checks.append(f"{n} {'yes' if holds else 'no'} (trial {b['trial']}: test {fmt(b['test_accuracy'])} vs "
                          f"{fmt(d['test_accuracy'])}, forgetting {fmt(b['forgetting'])} vs {fmt(d['forgetting'])}, "
                          f"{mib(b['peak_bytes'])} vs {mib(d['peak_bytes'])} MiB)")
        lines.append(f"- seed {r['seed']}: " + "; ".join(checks))
    return lines


def render_bounded(part: str, rows: list[dict]) -> list[str]:
    spec = PARTS[part]
    names = [n for n in STRATEGIES[part] if all(n in r["strategies"] for r in rows)]
    space = f" on {Path(spec['space']).name}" if "space" in spec else ""
    if all(arm.get("warm_start") for arm in STRATEGIES[part].values()):
        space += ", warm-started (`--warm-start`: its first trial peft's LoRA defaults, r 8, alpha 16, q/v, lr 2e-4),"
    lines = [(f"## {part}: {BOUNDED[part]}'s search{space} held to the default recipe's costs, {spec['trials']} trained trials x "
             f"{spec['max_steps']} steps per strategy, {spec['val_size']} validation / {spec['test_size']} test rows, "
             f"seeds {', '.join(str(r['seed']) for r in rows)}"), "",
             ("Per seed the default LoRA recipe trains first; each strategy then searches under `--memory-budget` "
             "set to the recipe's measured peak (configurations estimated above it are rejected before training "
             "and not counted as trials), and exports the most accurate trial at no more forgetting than the "
             "recipe's (`--select max-accuracy-under-forgetting=F`, F the recipe's). Medians over seeds; test "
             "accuracy read from the exported trial's saved adapter, peak measured on a full-length batch."), "",
             ("| strategy | best val accuracy | hypervolume | export: val / test accuracy | export forgetting | "
             "export peak MiB | rejected by the budget | trials to random's best | wall s |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        results = [r["strategies"][name] for r in rows]
        bound = [r["export"]["recipe-bound"] or {} for r in results]
        targets = [r["strategies"]["random"]["best_val_accuracy"] for r in rows]
        reach = [trials_to_reach(res, target) for res, target in zip(results, targets)]
        rejected = [sum(1 for t in res["trials"] if t.get("over_budget")) for res in results]
        lines.append(
            f"| {name} | {fmt(median([r['best_val_accuracy'] for r in results]))} | "
            f"{fmt(median([r['hypervolume'] for r in results]))} | "
            f"{fmt(median([b.get('val_accuracy') for b in bound]))} / {fmt(median([b.get('test_accuracy') for b in bound]))} | "
            f"{fmt(median([b.get('forgetting') for b in bound]))} | {mib(median([b.get('peak_bytes') for b in bound]))} | "
            f"{rejected} | {reach} | {fmt(median([r['wall_seconds'] for r in results]), '.0f')} |")
    lines.append(recipe_row(rows, drift=False))
    lines += ["", ("Goal check per seed: does the export beat the recipe on test accuracy at no more forgetting and no "
              "more peak memory? (— : no trial qualified, the recipe stays)"), ""]
    return lines + goal_checks(rows, names, "recipe-bound") + [""]


def render_pruning(rows: list[dict]) -> list[str]:
    spec = PARTS["pruning"]
    # The target each row was measured against, recorded with it: a later quality run must not move it.
    target = {r["seed"]: r.get("target") for r in rows}
    lines = [(f"## pruning: TPE in scalar mode (objective: validation accuracy), {spec['max_steps']} steps per trial, "
             f"{spec['timeout']:.0f} s of search per run, with and without hyperband"), "",
             ("Target: the same seed's random-search final best validation accuracy in part quality as it stood when "
             "this part ran (recorded with each row). Seconds are "
             "counted from the first trial's start (model loading excluded, the same for both)."), "",
             "| seed | target | hyperband: s to target | no pruning: s to target | ratio | hyperband trials (complete / pruned) | no pruning trials |",
             "|---|---|---|---|---|---|---|"]
    ratios = []
    for r in rows:
        goal = target.get(r["seed"])
        if goal is None:
            continue
        fast, slow = (seconds_to_reach(r["strategies"][n], goal) for n in ("hyperband", "no pruning"))
        ratio = fast / slow if fast is not None and slow else None
        ratios.append(ratio)
        states = {n: [t["state"] for t in r["strategies"][n]["trials"]] for n in ("hyperband", "no pruning")}
        lines.append(f"| {r['seed']} | {goal:.4f} | {fmt(fast, '.0f')} | {fmt(slow, '.0f')} | {fmt(ratio, '.2f')} | "
                     f"{states['hyperband'].count('COMPLETE')} / {states['hyperband'].count('PRUNED')} | "
                     f"{states['no pruning'].count('COMPLETE')} |")
    lines += ["", f"Median ratio (hyperband / no pruning) where both reached the target: {fmt(median(ratios), '.2f')}",
              ""]
    return lines


def render_pruning_long(rows: list[dict]) -> list[str]:
    spec = PARTS["pruning-long"]
    rungs = pruning_long_rungs(spec["max_steps"])
    lines = [(f"## pruning-long: random search, {spec['max_steps']} steps per trial, {spec['trials']} trials without "
             f"pruning, then the same draws under hyperband (first rung at {rungs[0]} steps)"), "",
             ("Target: the run without pruning's final best validation accuracy, first reached at its k-th trial. "
             "Seconds from the first trial's start. 'same draws': the hyperband run's trials had the same "
             "configurations as the run without pruning, in the same order."), "",
             ("| seed | target | k | no pruning: s to target | hyperband: s to target | ratio | "
             f"hyperband trials (complete / pruned at {' / at '.join(map(str, rungs))}) | same draws |"),
             "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for r in rows:
        unpruned, pruned = r["strategies"]["no pruning"], r["strategies"]["hyperband"]
        slow, fast = seconds_to_reach(unpruned, r["target"]), seconds_to_reach(pruned, r["target"])
        ratio = fast / slow if fast is not None and slow else None
        ratios.append(ratio)
        trials = trained_trials(pruned)
        stopped_at = [t.get("steps_trained") for t in trials if t["state"] == "PRUNED"]
        counts = [sum(t["state"] == "COMPLETE" for t in trials)] + [stopped_at.count(step) for step in rungs]
        same = all(a["params"] == b["params"] for a, b in zip(trials, trained_trials(unpruned)))
        lines.append(f"| {r['seed']} | {r['target']:.4f} | {trials_to_reach(unpruned, r['target'])} | "
                     f"{fmt(slow, '.0f')} | {fmt(fast, '.0f')} | {fmt(ratio, '.2f')} | "
                     f"{' / '.join(map(str, counts))} | {'yes' if same else 'no'} |")
    lines += ["", (f"Median ratio (hyperband / no pruning), a run that never reached the target counting as "
              f"above 1: {fmt(median([r if r is not None else float('inf') for r in ratios]), '.2f')}"), ""]
    return lines + whole_search_lines(rows)


def whole_search_lines(rows: list[dict]) -> list[str]:
    """The same draws, as many as the run without pruning, under hyperband: the whole search's seconds and
    best, against the run without pruning (`--only "hyperband whole search"`)."""
    rows = [r for r in rows if "hyperband whole search" in r["strategies"]]
    if not rows:
        return []
    lines = [("The whole search: the same draws, as many as without pruning, under hyperband. Seconds from the "
             "first trial's start to the last one's end; regret: the best validation accuracy without pruning "
             "less the best with it."), "",
             ("| seed | trials (complete / pruned) | no pruning: s | hyperband: s | ratio | best val: no pruning / "
             "hyperband | regret | same draws |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unpruned, pruned = r["strategies"]["no pruning"], r["strategies"]["hyperband whole search"]
        slow, fast = (max(t["seconds_from_start"] for t in trained_trials(x)) for x in (unpruned, pruned))
        trials = trained_trials(pruned)
        same = len(trials) == len(trained_trials(unpruned)) and all(
            a["params"] == b["params"] for a, b in zip(trials, trained_trials(unpruned)))
        done = sum(t["state"] == "COMPLETE" for t in trials)
        lines.append(f"| {r['seed']} | {done} / {len(trials) - done} | {slow:.0f} | {fast:.0f} | {fast / slow:.2f} | "
                     f"{unpruned['best_val_accuracy']:.4f} / {pruned['best_val_accuracy']:.4f} | "
                     f"{unpruned['best_val_accuracy'] - pruned['best_val_accuracy']:.3f} | {'yes' if same else 'no'} |")
    return lines + [""]


def render(results: dict) -> str:
    lines = ["# Search strategies against the alternatives", "", f"Machine: {results['machine']}  "]
    for part, command in results["commands"].items():
        lines.append(f"{part}: `{command}`  ")
    lines.append("")
    for part in ("quality", "longer", "bounded", "pruning", "pruning-long", "causal", *CAUSAL_BOUNDED):
        rows = results["parts"].get(part)
        if not rows:
            continue
        if part == "pruning":
            lines += render_pruning(rows)
        elif part == "pruning-long":
            lines += render_pruning_long(rows)
        elif part in BOUNDED:
            lines += render_bounded(part, rows)
        else:
            lines += render_quality(part, rows)
    discussion = HERE / "discussion.md"
    return "\n".join(lines) + "\n" + (discussion.read_text() if discussion.exists() else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=list(PARTS))
    parser.add_argument("--render-only", action="store_true", help="re-render results.md from results.json")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", default=None, help="a tiny model folder: check the script, write nothing here")
    parser.add_argument("--only", default=None, help="comma-separated strategies of the part to run; their rows "
                        "are added to the part's recorded seeds (its default recipe and other strategies kept)")
    args = parser.parse_args()
    if args.render_only:
        (HERE / "results.md").write_text(render(json.loads((HERE / "results.json").read_text())))
        return
    if args.part is None:
        parser.error("--part is required")
    names = args.only.split(",") if args.only else list(STRATEGIES[args.part])
    unknown = [n for n in names if n not in STRATEGIES[args.part]]
    if unknown:
        parser.error(f"--only: unknown strategies {unknown}; {args.part} has {list(STRATEGIES[args.part])}")
    out = Path(tempfile.mkdtemp()) if args.smoke else HERE
    recorded_file = HERE / "results.json"  # read even by a smoke run, which writes elsewhere
    results = json.loads(recorded_file.read_text()) if recorded_file.exists() else {"parts": {}, "commands": {}}
    recorded = {row["seed"]: row for row in results["parts"].get(args.part, [])} if args.only else {}
    rows = run_part(args.part, args.seeds, args.smoke, names, recipe=not all(s in recorded for s in range(args.seeds)),
                    recorded=recorded)
    for row in rows:  # --only: added to the recorded row of the same seed (a new seed is recorded whole)
        recorded.setdefault(row["seed"], row)["strategies"].update(row["strategies"])
    results["parts"][args.part] = [recorded[s] for s in sorted(recorded)]
    command = "python experiments/search/bench.py " + shlex.join(sys.argv[1:])
    results["commands"][f"{args.part} --only {args.only}" if args.only else args.part] = command
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only"
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
