"""Which mid-training score tells a pruner which trials will end best?

The trials: the 10 random draws per seed that `bench.py --part pruning-long` trained for 240 steps without
pruning (MiniLM, Rotten Tomatoes, results.json), with their final validation accuracy. Each is retrained
with its own seed (a trial depends on its seed alone) to 90 steps, and at steps 15, 30 and 90 every
candidate score is measured on the slice the pruner sees (the first 256 validation rows):
  accuracy          the argmax's accuracy
  confidence-tied   accuracy, ties broken by the mean probability of the right class (what pruners compared
                    before session 11)
  separation        one-vs-rest ROC AUC (`autopeft.evaluate.class_separation`, what they compare now)
  log-likelihood    mean log-probability of the right class
Per score and step: the Spearman rank correlation with the final accuracy, per seed and over all trials.

Then a replay of the pruning-long race on these draws: Optuna's hyperband pruner (the bench's settings and
study names, so the same brackets) fed each score at its rungs (30 and 90), and an oracle fed the final
accuracy; a pruned trial costs its unpruned seconds times the fraction of steps it trained (evaluations not
counted). Seconds until a completed trial reaches the seed's target (random search's final best), against
the unpruned arm's: what each score could give the race at best, since the draws are fixed.

Run:  .venv/bin/python experiments/search/early_signal.py     (about 20 minutes here; writes early_signal.json/.md)
      (--replay-only recomputes the correlations and the replay from early_signal.json, in seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

warnings.filterwarnings("ignore")

import optuna
import torch
from scipy.stats import spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench

from autopeft.config import SearchConfig
from autopeft.evaluate import Evaluator, class_probabilities, class_separation
from autopeft.search import prepare_runtime, run_trial
from autopeft.space import TrialParams
from autopeft.study import make_pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)
STEPS = (15, 30, 90)
SCORES = ("accuracy", "confidence-tied", "separation", "log-likelihood")
ORACLE = "oracle (final accuracy)"
MAX_STEPS = bench.PARTS["pruning-long"]["max_steps"]
SEQUENCES = 200


class Enough(Exception):
    """Raised at the last measured step: the rest of the trial is not needed."""


def scores(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    right = probabilities.gather(1, labels[:, None]).squeeze(1)
    accuracy = float((probabilities.argmax(-1) == labels).float().mean())
    return {"accuracy": accuracy, "confidence-tied": accuracy + float(right.mean()) / (len(labels) + 1),
            "separation": class_separation(probabilities, labels),
            "log-likelihood": float(right.clamp_min(1e-12).log().mean())}


@dataclass(frozen=True)
class RecordingEvaluator(Evaluator):
    """The task's evaluator, which also keeps every candidate score of its last mid-training check."""

    last: dict = field(default_factory=dict)

    def progress(self, model, split, device=None) -> tuple[float, float]:
        probabilities = class_probabilities(model, split, pad_id=self.pad_id, device=device)
        self.last.update(scores(probabilities, split.labels.long()))
        return super().progress(model, split, device)


def measure_seed(row: dict) -> list[dict]:
    config = SearchConfig(**bench.base_config("pruning-long", row["seed"], Path(tempfile.mkdtemp()), None))
    runtime = prepare_runtime(config)
    recorder = RecordingEvaluator(pad_id=runtime.pad_id)
    runtime = replace(runtime, evaluate=recorder)
    measured: list[dict] = []
    for trial in bench.trained_trials(row["strategies"]["no pruning"]):
        record = {"seed": row["seed"], "number": trial["number"], "final": trial["val_accuracy"], "at": {}}

        def keep(step: int, _score: float, record: dict = record) -> None:
            record["at"][str(step)] = dict(recorder.last)
            if step == STEPS[-1]:
                raise Enough

        began = time.perf_counter()
        try:
            run_trial(runtime, TrialParams.from_flat(trial["params"]), seed=config.seed + trial["number"],
                      on_checkpoint=keep, checkpoints=STEPS)
        except Enough:
            pass
        print(f"seed {row['seed']} trial {trial['number']}: final {record['final']:.3f}, at 30 "
              f"{ {k: round(v, 4) for k, v in record['at']['30'].items()} } ({time.perf_counter() - began:.0f} s)",
              flush=True)
        measured.append(record)
    return measured


def correlation(records: list[dict], score: str, step: int) -> float:
    return float(spearmanr([r["at"][str(step)][score] for r in records], [r["final"] for r in records]).correlation)


def unpruned_seconds(row: dict) -> list[float]:
    """Each trial's seconds in the unpruned arm, in start order."""
    ends = [t["seconds_from_start"] for t in bench.trained_trials(row["strategies"]["no pruning"])]
    return [end - start for end, start in zip(ends, [0.0, *ends[:-1]])]


def race(study_name: str, records: list[dict], seconds: list[float], score: str | None) -> dict:
    """The trials run in the given order with hyperband deciding on `score` (None: on the final accuracy, an
    oracle), against the same trials unpruned. `to_best`: seconds until a completed trial reaches the best
    final accuracy among them, pruned over unpruned (inf if every trial reaching it was pruned). `total`:
    seconds for all the trials, pruned over unpruned. `regret`: the best final accuracy less the best the
    pruned search completed."""
    best = max(r["final"] for r in records)
    rungs = bench.pruning_long_rungs(MAX_STEPS)
    study = optuna.create_study(study_name=study_name, direction="maximize",
                                pruner=make_pruner(bench.pruning_long_pruner(MAX_STEPS)))
    spent, reached, completed = [], None, []
    for record, duration in zip(records, seconds):
        trial, stopped_at = study.ask(), None
        for rung in rungs:
            trial.report(record["final"] if score is None else record["at"][str(rung)][score], rung)
            if trial.should_prune():
                stopped_at = rung
                break
        if stopped_at is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            spent.append(duration * stopped_at / MAX_STEPS)
            continue
        study.tell(trial, record["final"])
        spent.append(duration)
        completed.append(record["final"])
        if reached is None and record["final"] >= best - 1e-9:
            reached = sum(spent)
    unpruned_to_best = next(sum(seconds[:i + 1]) for i, r in enumerate(records) if r["final"] >= best - 1e-9)
    return {"to_best": math.inf if reached is None else reached / unpruned_to_best,
            "total": sum(spent) / sum(seconds), "regret": best - max(completed)}


def summary(races: list[dict]) -> dict:
    to_best = [r["to_best"] for r in races]
    return {"median_to_best": statistics.median(to_best),
            "share_at_most_half": sum(r <= 0.5 for r in to_best) / len(to_best),
            "share_best_pruned": sum(r == math.inf for r in to_best) / len(to_best),
            "median_total": statistics.median(r["total"] for r in races),
            "median_regret": statistics.median(r["regret"] for r in races)}


def replays(rows: list[dict], records: list[dict]) -> dict:
    """Per seed and score: the ratio in the recorded order; over SEQUENCES random orders of the same 10
    draws; and over SEQUENCES searches of 20 and 40 trials drawn (with replacement) from those 10, whose
    target is their own best: how the ratio moves with where the target falls and with a search's length."""
    out = {}
    rng = random.Random(0)
    for row in rows:
        mine, seconds = [r for r in records if r["seed"] == row["seed"]], unpruned_seconds(row)
        name = f"pruning-long-hyperband-{row['seed']}"  # the bench's study: the same brackets per trial number
        searches = {"10, recorded order": [list(range(len(mine)))],
                    "10, any order": [rng.sample(range(len(mine)), len(mine)) for _ in range(SEQUENCES)],
                    **{f"{n} drawn": [rng.choices(range(len(mine)), k=n) for _ in range(SEQUENCES)] for n in (20, 40)}}
        out[str(row["seed"])] = {
            label: {score or ORACLE: summary([race(name, [mine[i] for i in order], [seconds[i] for i in order], score)
                                              for order in orders])
                    for score in (*SCORES, None)}
            for label, orders in searches.items()}
    return out


def render(results: dict) -> str:
    lines = ["# Which mid-training score predicts a trial's final accuracy?", "",
             (f"`{results['command']}` on {results['machine']}. Trials: pruning-long's unpruned random draws "
             "(MiniLM, 240 steps, 10 per seed, seeds 0-2). Spearman rank correlation of each score on the "
             "pruner's 256-row validation slice with the trial's final validation accuracy (500 rows): all 30 "
             "trials, then per seed."), "",
             "| score | " + " | ".join(f"step {s}" for s in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for score in SCORES:
        cells = [f"{c['all']:.2f} ({', '.join(f'{v:.2f}' for v in c['per_seed'])})"
                 for c in (results["correlations"][score][str(s)] for s in STEPS)]
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    lines += ["", ("Replay of the pruning-long race on the same draws: Optuna's hyperband pruner (rungs 30 and 90, "
              "the bench's study names, so the same brackets) deciding on each score, or on the final accuracy "
              "(an oracle); a pruned trial costs its seconds in pruning-long's run without pruning (results.json) "
              "times the share of steps it trained (evaluations not counted). Cell: over the searches, the median ratio of seconds until a "
              "completed trial reaches the search's best final accuracy, pruned to unpruned (inf: every trial "
              "reaching it pruned), the share of searches at or below 0.5 / with the best pruned; then the "
              "median ratio of seconds for all the search's trials, and the median regret (the best final "
              "accuracy less the best the pruned search completed). Searches: the recorded order; "
              f"{SEQUENCES} random orders of the same 10 draws; {SEQUENCES} searches of 20 and of 40 trials drawn "
              "with replacement from the seed's 10."), ""]
    for seed, searches in results["replay"].items():
        lines += [f"Seed {seed}:", "", "| search | " + " | ".join([*SCORES, ORACLE]) + " |",
                  "|---|" + "---|" * (len(SCORES) + 1)]
        for label, arms in searches.items():
            cells = [f"{a['median_to_best']:.2f} ({a['share_at_most_half']:.0%} / {a['share_best_pruned']:.0%}); "
                     f"{a['median_total']:.2f}, {a['median_regret']:.3f}" for a in arms.values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replay-only", action="store_true",
                        help="recompute the correlations and the replay from early_signal.json; train nothing")
    args = parser.parse_args()
    recorded = json.loads((HERE / "results.json").read_text())
    rows = recorded["parts"]["pruning-long"]
    if args.replay_only:
        records = json.loads((HERE / "early_signal.json").read_text())["trials"]
    else:
        records = [record for row in rows for record in measure_seed(row)]
    correlations = {score: {str(step): {
        "all": correlation(records, score, step),
        "per_seed": [correlation([r for r in records if r["seed"] == row["seed"]], score, step) for row in rows]}
        for step in STEPS} for score in SCORES}
    command = "python experiments/search/early_signal.py" + (
        " --replay-only, on the trials' scores measured by a run without it" if args.replay_only else "")
    results = {"command": command, "machine": recorded["machine"],
               "trials": records, "correlations": correlations, "replay": replays(rows, records)}
    (HERE / "early_signal.json").write_text(json.dumps(results, indent=2))
    (HERE / "early_signal.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
