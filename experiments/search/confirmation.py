"""What `autopeft export --confirm-seeds` buys: an export whose accuracy holds up when it is trained again.

A search keeps its best run, and the best of many noisy runs is usually a lucky one (seed_spread.md). With
`--confirm-seeds 2 --confirm-top 3`, export retrains the rule's three leading candidates twice more each with
new seeds and exports the one that leads on the mean of its three runs. Six extra trainings: the alternative a
user has for the same compute is six more trials. This script compares, per seed, three exports of one search
(bench part `quality`: MiniLM, 60 steps, TPE on validation accuracy alone, 10 trials):
  plain        `autopeft export --select max-accuracy-under-forgetting=1` (the most accurate trial),
  confirmed    the same with `--confirm-seeds 2 --confirm-top 3`,
  more trials  the same study continued to 16 trials, then exported as plain.
Each exported configuration is then judged by what a user gets who trains it again: three more training seeds
(JUDGE_SEEDS, used by none of the arms), mean validation and held-out test accuracy.

A second table needs no training: seed_spread.json's five extra runs of random search's three best
configurations (parts `longer` and `bounded`), taken as what each configuration gives, replay the choice
with every pair of the five as the confirming runs.

Run:  .venv/bin/python experiments/search/confirmation.py              (about 55 minutes here)
      --render-only rewrites confirmation.md from confirmation.json; --smoke MODEL_DIR checks the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

warnings.filterwarnings("ignore")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench
import seed_spread

from autopeft.export import export_trial, select_trial
from autopeft.search import prepare_runtime, run_search, run_trial
from autopeft.space import TrialParams
from autopeft.study import scores

PART, STRATEGY = "quality", "tpe-accuracy"
RULE = "max-accuracy-under-forgetting=1"  # the most accurate trial: the probe's forgetting never exceeds 1
CONFIRM_SEEDS, CONFIRM_TOP = 2, 3
JUDGE_SEEDS = (3000, 3001, 3002)
ARMS = ("plain", "confirmed", "more trials")


def run_seed(seed: int, smoke_model: str | None) -> dict:
    result, config, folder = bench.run_strategy(PART, STRATEGY, seed, smoke_model)
    picks, seconds = {}, {}
    for arm, extra in (("plain", 0), ("confirmed", CONFIRM_SEEDS)):
        began = time.perf_counter()
        exported = export_trial(config.study, config.storage, folder / arm, rule=RULE, confirm_seeds=extra,
                                confirm_top=CONFIRM_TOP if extra else None)
        seconds[arm] = time.perf_counter() - began
        picks[arm] = {"trial": exported.trial.number, "own_test_accuracy": exported.test_accuracy,
                      "confirmation": [c.as_dict() for c in exported.confirmations]}
    began = time.perf_counter()
    longer = run_search(replace(config, trials=config.trials + CONFIRM_SEEDS * CONFIRM_TOP)).study
    seconds["more trials"] = time.perf_counter() - began
    picks["more trials"] = {"trial": select_trial(longer, RULE).number}
    trials = {t.number: t for t in longer.trials}
    for pick in picks.values():
        trial = trials[pick["trial"]]
        pick.update(params=trial.user_attrs["params"], val_accuracy=scores(trial)[0])
    return {"seed": seed, "trials": result["trials"], "search_seconds": result["wall_seconds"],
            "extra_seconds": seconds, "picks": picks, "judged": judge(config, picks)}


def judge(config, picks: dict) -> dict[str, list[list[float]]]:
    """[validation, test] accuracy of each picked configuration trained with each of JUDGE_SEEDS."""
    runtime = prepare_runtime(config)
    judged: dict[str, list[list[float]]] = {}
    for pick in picks.values():
        name = seed_spread.key(pick["params"])
        if name in judged:
            continue
        params, judged[name] = TrialParams.from_flat(pick["params"]), []
        for seed in JUDGE_SEEDS:
            outcome = run_trial(runtime, params, seed=seed)
            judged[name].append([outcome.accuracy, runtime.evaluate(outcome.model, runtime.test, runtime.device)])
            print(f"seed {config.seed} judge {params.method} training seed {seed}: val {judged[name][-1][0]:.3f} "
                  f"test {judged[name][-1][1]:.3f}", flush=True)
    return judged


def judged_means(row: dict, arm: str) -> tuple[float, float]:
    runs = row["judged"][seed_spread.key(row["picks"][arm]["params"])]
    return statistics.fmean(r[0] for r in runs), statistics.fmean(r[1] for r in runs)


def replay(part: str, row: dict, runs: dict[str, list[float]]) -> dict:
    """seed_spread's runs of random search's three best, taken as what each configuration gives: the plain
    pick, and the confirmed pick (its recorded run and two of its five new runs, over all ten pairs), each
    judged by its configuration's mean over the five."""
    configs = seed_spread.measured(part, row, runs)
    recorded = {name: max(acc for _, acc in entry["tried"][seed_spread.REFERENCE])
                for name, entry in configs.items() if seed_spread.REFERENCE in entry["tried"]}
    leading = sorted(recorded, key=lambda name: -recorded[name])[:CONFIRM_TOP]
    picks = []
    for pair in itertools.combinations(range(len(seed_spread.TRAINING_SEEDS)), CONFIRM_SEEDS):
        picks.append(max(leading, key=lambda n: statistics.fmean([recorded[n], *(configs[n]["runs"][i] for i in pair)])))
    return {"part": part, "seed": row["seed"], "plain": seed_spread.mean(configs[leading[0]]),
            "confirmed": statistics.fmean(seed_spread.mean(configs[pick]) for pick in picks),
            "best": max(seed_spread.mean(configs[name]) for name in leading),
            "changed": sum(pick != leading[0] for pick in picks), "pairs": len(picks)}


def render(results: dict) -> str:
    rows = results["rows"]
    lines = ["# What `export --confirm-seeds` buys", "",
             (f"`{results['command']}` on {results['machine']}. Part `{PART}`'s search (MiniLM, "
             f"{bench.PARTS[PART]['max_steps']} steps, {bench.PARTS[PART]['trials']} trials, TPE on validation "
             f"accuracy), exported with `--select {RULE}` three ways: **plain**; **confirmed** "
             f"(`--confirm-seeds {CONFIRM_SEEDS} --confirm-top {CONFIRM_TOP}`: {CONFIRM_SEEDS * CONFIRM_TOP} "
             f"more trainings); **more trials** (the same study continued by {CONFIRM_SEEDS * CONFIRM_TOP} "
             "trials, the same compute spent on search instead). Each pick is judged by training its "
             f"configuration again with seeds {', '.join(map(str, JUDGE_SEEDS))}: the mean validation and "
             "test accuracy a user who retrains it gets."), "",
             "| seed | arm | trial | its run (val) | judged val | judged test | extra seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for arm in ARMS:
            pick, (val, test) = row["picks"][arm], judged_means(row, arm)
            lines.append(f"| {row['seed']} | {arm} | {pick['trial']} | {pick['val_accuracy']:.3f} | {val:.4f} | "
                         f"{test:.4f} | {row['extra_seconds'][arm]:.0f} |")
    lines += ["", "Medians over seeds (judged):", "", "| arm | val | test |", "|---|---|---|"]
    for arm in ARMS:
        val = statistics.median(judged_means(row, arm)[0] for row in rows)
        test = statistics.median(judged_means(row, arm)[1] for row in rows)
        lines.append(f"| {arm} | {val:.4f} | {test:.4f} |")
    lines += ["", "## Replayed on seed_spread.json (no training)", "",
              (f"Random search's {CONFIRM_TOP} best configurations per seed in parts `longer` and `bounded`, "
              "each with five extra runs, taken as what the configuration gives. The plain pick is random "
              "search's best run; the confirmed pick leads on the mean of its recorded run and "
              f"{CONFIRM_SEEDS} of the five (every pair of the five, averaged). Each pick is judged by its "
              "configuration's mean over the five; 'best' is the best such mean of the three."), "",
              "| part | seed | plain pick | confirmed pick | best of the three | pairs where the pick changed |",
              "|---|---|---|---|---|---|"]
    for r in results["replay"]:
        lines.append(f"| {r['part']} | {r['seed']} | {r['plain']:.4f} | {r['confirmed']:.4f} | {r['best']:.4f} | "
                     f"{r['changed']} of {r['pairs']} |")
    return "\n".join(lines) + "\n"


def replays() -> list[dict]:
    spread = json.loads((HERE / "seed_spread.json").read_text())["parts"]
    recorded = json.loads((HERE / "results.json").read_text())["parts"]
    return [replay(part, next(r for r in recorded[part] if r["seed"] == int(seed)), runs)
            for part, result in spread.items() for seed, runs in sorted(result["runs"].items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", help="a tiny model folder: check the script in a minute, write nothing")
    parser.add_argument("--render-only", action="store_true", help="rewrite confirmation.md from confirmation.json")
    args = parser.parse_args()
    out = HERE / "confirmation.json"
    if args.render_only:
        results = json.loads(out.read_text())
    else:
        results = {"command": "python experiments/search/confirmation.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else ""),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "rows": [run_seed(seed, args.smoke) for seed in range(args.seeds)], "replay": replays()}
        if args.smoke:
            print(render(results))
            return
        out.write_text(json.dumps(results, indent=2))
    (HERE / "confirmation.md").write_text(render(results))


if __name__ == "__main__":
    main()
