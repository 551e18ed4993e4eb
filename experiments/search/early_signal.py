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

Run:  .venv/bin/python experiments/search/early_signal.py     (about 15 minutes; writes early_signal.json/.md)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

warnings.filterwarnings("ignore")

import optuna  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402

from autopeft.config import SearchConfig  # noqa: E402
from autopeft.evaluate import Evaluator, class_probabilities, class_separation  # noqa: E402
from autopeft.search import INTERMEDIATE_ROWS, prepare_runtime, run_trial  # noqa: E402
from autopeft.space import TrialParams  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
STEPS = (15, 30, 90)
SCORES = ("accuracy", "confidence-tied", "separation", "log-likelihood")


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

        def keep(step: int, _score: float) -> None:
            record["at"][step] = dict(recorder.last)
            if step == STEPS[-1]:
                raise Enough

        began = time.perf_counter()
        try:
            run_trial(runtime, TrialParams.from_flat(trial["params"]), seed=config.seed + trial["number"],
                      on_checkpoint=keep, checkpoints=STEPS)
        except Enough:
            pass
        print(f"seed {row['seed']} trial {trial['number']}: final {record['final']:.3f}, at 30 "
              f"{ {k: round(v, 4) for k, v in record['at'][30].items()} } ({time.perf_counter() - began:.0f} s)",
              flush=True)
        measured.append(record)
    return measured


def correlation(records: list[dict], score: str, step: int) -> float:
    return float(spearmanr([r["at"][step][score] for r in records], [r["final"] for r in records]).correlation)


def replay(row: dict, records: list[dict], score: str | None) -> float | None:
    """Seconds until a completed trial reaches the target, hyperband deciding on `score` (None: the final
    accuracy, an oracle); None if every draw before the target's was spent and the target's was pruned."""
    unpruned = bench.trained_trials(row["strategies"]["no pruning"])
    ends = [t["seconds_from_start"] for t in unpruned]
    seconds = [end - start for end, start in zip(ends, [0.0, *ends[:-1]])]
    rungs = bench.pruning_long_rungs(bench.PARTS["pruning-long"]["max_steps"])
    study = optuna.create_study(study_name=f"pruning-long-hyperband-{row['seed']}", direction="maximize",
                                pruner=optuna.pruners.HyperbandPruner(min_resource=rungs[0], max_resource=240,
                                                                      reduction_factor=3))
    spent = 0.0
    for record, duration in zip(records, seconds):
        trial, stopped_at = study.ask(), None
        for rung in rungs:
            trial.report(record["final"] if score is None else record["at"][rung][score], rung)
            if trial.should_prune():
                stopped_at = rung
                break
        if stopped_at is not None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            spent += duration * stopped_at / 240
            continue
        study.tell(trial, record["final"])
        spent += duration
        if record["final"] >= row["target"] - 1e-9:
            return spent
    return None


def render(results: dict) -> str:
    lines = ["# Which mid-training score predicts a trial's final accuracy?", "",
             f"`{results['command']}` on {results['machine']}. Trials: pruning-long's unpruned random draws "
             "(MiniLM, 240 steps, 10 per seed, seeds 0-2). Spearman rank correlation of each score on the "
             "pruner's 256-row validation slice with the trial's final validation accuracy (500 rows): all 30 "
             "trials, then per seed.", "",
             "| score | " + " | ".join(f"step {s}" for s in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for score in SCORES:
        cells = [f"{c['all']:.2f} ({', '.join(f'{v:.2f}' for v in c['per_seed'])})"
                 for c in (results["correlations"][score][str(s)] for s in STEPS)]
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    lines += ["", "Replay of the pruning-long race on the same draws (hyperband, rungs 30 and 90, the bench's "
              "brackets; a pruned trial costs its share of the steps; evaluations not counted): seconds until "
              "a completed trial reaches random search's final best, and the ratio to the unpruned arm's "
              "seconds. — : the target's own trial was pruned.", "",
              "| seed | target (trial) | unpruned s | " + " | ".join(results["replay"]["0"]) + " |",
              "|---|---|---|" + "---|" * len(results["replay"]["0"])]
    for seed, arms in results["replay"].items():
        row = results["targets"][seed]
        cells = [f"{s:.0f} ({s / row['seconds']:.2f})" if s is not None else "—" for s in arms.values()]
        lines.append(f"| {seed} | {row['target']:.3f} ({row['trial'] + 1}) | {row['seconds']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    recorded = json.loads((HERE / "results.json").read_text())
    rows = recorded["parts"]["pruning-long"]
    records = [record for row in rows for record in measure_seed(row)]
    correlations = {score: {str(step): {
        "all": correlation(records, score, step),
        "per_seed": [correlation([r for r in records if r["seed"] == row["seed"]], score, step) for row in rows]}
        for step in STEPS} for score in SCORES}
    targets, replays = {}, {}
    for row in rows:
        mine = [r for r in records if r["seed"] == row["seed"]]
        unpruned = row["strategies"]["no pruning"]
        winner = next(r for r in mine if r["final"] >= row["target"] - 1e-9)
        targets[str(row["seed"])] = {"target": row["target"], "trial": winner["number"],
                                     "seconds": bench.seconds_to_reach(unpruned, row["target"])}
        replays[str(row["seed"])] = {**{score: replay(row, mine, score) for score in SCORES},
                                     "oracle (final accuracy)": replay(row, mine, None)}
    results = {"command": "python experiments/search/early_signal.py", "machine": recorded["machine"],
               "trials": records, "correlations": correlations, "targets": targets, "replay": replays}
    (HERE / "early_signal.json").write_text(json.dumps(results, indent=2))
    (HERE / "early_signal.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
