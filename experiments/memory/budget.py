"""Budget respect: does a search under `--memory-budget` admit only configurations that fit, and reject the
others cheaply?

1. The budget: the median traced estimate of 40 configurations drawn at random from
   configs/budget_space.yaml (LoRA, DoRA, adapter, prefix, IA3 x micro-batch 8-128 x AdamW/Adafactor/SGD x
   checkpointing on/off) on the packaged MiniLM, so it cuts the space roughly in half.
2. A real search (`autopeft.search.run_search`, random sampler, so rejections are not steered away from)
   under that budget until 8 trials are admitted and trained (a few steps each: here only memory matters).
   Every admitted trial's real peak is measured on a copy with the same live-bytes accounting
   (`memory.measure`, the search does this by itself on the CPU when a budget is set).
3. Reported: admitted trials measured above the budget (goal: zero), rejected trials' wall time from
   Optuna's start/complete stamps (goal: under 1 s each), and the fraction of drawn configurations rejected.

Run:  .venv/bin/python experiments/memory/budget.py     (writes budget_results.json / budget_results.md here,
      and appends the run's verdict to budget_history.json)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import optuna

from autopeft import memory
from autopeft.config import SearchConfig, format_bytes
from autopeft.search import prepare_runtime, run_search, train_settings
from autopeft.space import load_space
from autopeft.study import rejected_by_budget

HERE = Path(__file__).resolve().parent
SPACE = HERE / "configs" / "budget_space.yaml"
DRAWS = 40
ADMITTED = 8
SEARCH = {"model": "packaged:all-MiniLM-L6-v2", "space": str(SPACE), "max_steps": 4, "train_size": 1000, "val_size": 100,
              "test_size": 100, "max_length": 128, "probes": ("representation_drift",), "sampler": "random", "seed": 0}
optuna.logging.set_verbosity(optuna.logging.WARNING)


def median_budget(folder: Path) -> tuple[int, list[int]]:
    """Traced estimates of DRAWS random configurations; their median is the budget."""
    config = SearchConfig(**SEARCH, storage=f"sqlite:///{folder}/draws.db", tracking_uri=f"sqlite:///{folder}/m.db")
    space = load_space(config.space)
    runtime = prepare_runtime(config, space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=123))
    seq_len = runtime.longest_row
    totals = []
    for _ in range(DRAWS):
        trial = study.ask()
        params = space.suggest(trial)
        estimate = memory.estimate_traced(runtime.base_model, params.method, params.method_params,
                                          train_settings(params, max_steps=config.max_steps, seed=0),
                                          seq_len=seq_len, num_labels=len(runtime.task.label_names),
                                          max_steps=config.max_steps)
        totals.append(estimate.total)
        study.tell(trial, 0.0)
    return int(statistics.median(totals)), totals


def trial_row(trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    params = attrs.get("params", {})
    return {"number": trial.number, "state": trial.state.name, "method": params.get("method"),
            "micro_batch_size": params.get("micro_batch_size"), "optimizer": params.get("optimizer"),
            "gradient_checkpointing": params.get("gradient_checkpointing"),
            "estimate": attrs.get("memory_estimate", {}).get("total"),
            "estimate_level": attrs.get("memory_estimate", {}).get("level"),
            "measured": attrs.get("memory_measured_bytes"),
            "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start else None,
            "reason": attrs.get("prune_reason") or attrs.get("fail_reason"), "over_budget": rejected_by_budget(trial)}


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="budget-"))
    budget, draws = median_budget(folder)
    config = SearchConfig(**SEARCH, trials=ADMITTED, memory_budget=budget, study="budget",
                          max_consecutive_failures=50, storage=f"sqlite:///{folder}/autopeft.db",
                          tracking_uri=f"sqlite:///{folder}/mlflow.db", artifacts_dir=str(folder / "artifacts"))
    began = time.perf_counter()
    summary = run_search(config)
    wall = time.perf_counter() - began
    rows = [trial_row(t) for t in summary.study.trials]
    admitted = [r for r in rows if r["state"] == "COMPLETE"]
    rejected = [r for r in rows if r["over_budget"]]
    over = [r for r in admitted if r["measured"] is None or r["measured"] > budget]
    result = {"command": "python experiments/memory/budget.py", "machine":
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
              "budget_bytes": budget, "draw_estimates": draws, "search_wall_seconds": wall, "trials": rows,
              "tracer_warm_up_seconds": summary.study.user_attrs.get("tracer_warm_up_seconds"),
              "admitted": len(admitted), "rejected": len(rejected), "admitted_over_budget": len(over),
              "rejected_fraction": len(rejected) / max(1, len(admitted) + len(rejected)),
              "rejected_seconds_max": max((r["seconds"] for r in rejected), default=None),
              "rejected_seconds_median": statistics.median([r["seconds"] for r in rejected]) if rejected else None,
              "rejected_by_level": {level: {"count": len(group), "max_seconds": max(r["seconds"] for r in group)}
                                    for level in ("analytic", "calibrated", "extrapolated-forward", "extrapolated", "traced")
                                    if (group := [r for r in rejected if r["estimate_level"] == level])},
              "worst_measured_over_budget": max((r["measured"] / budget for r in admitted if r["measured"]),
                                                default=None)}
    (HERE / "budget_results.json").write_text(json.dumps(result, indent=2))
    (HERE / "budget_results.md").write_text(render(result))
    record_run(result)
    print(render(result))


def record_run(result: dict) -> None:
    """Each run's verdict, appended to budget_history.json: rejection times vary from run to run on a shared
    machine, and one run's worst case is not the benchmark's."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, check=False, text=True, cwd=HERE)
    history_file = HERE / "budget_history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    history.append({"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit.stdout.strip() or None,
                    **{key: result[key] for key in ("budget_bytes", "admitted", "rejected", "admitted_over_budget",
                                                    "worst_measured_over_budget", "rejected_seconds_max",
                                                    "rejected_seconds_median", "search_wall_seconds")}})
    history_file.write_text(json.dumps(history, indent=2) + "\n")


def render(r: dict) -> str:
    lines = ["# Budget respect: a search under a budget that cuts the space in half", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
             (f"Budget: {format_bytes(r['budget_bytes'])} ({r['budget_bytes']} bytes), the median traced estimate of "
             f"{len(r['draw_estimates'])} random configurations of `configs/budget_space.yaml` on MiniLM "
             f"(range {format_bytes(min(r['draw_estimates']))} to {format_bytes(max(r['draw_estimates']))})."), "",
             (f"- admitted and trained: {r['admitted']}; measured above the budget: **{r['admitted_over_budget']}**; "
             f"highest measured peak: {r['worst_measured_over_budget']:.3f} of the budget"),
             (f"- rejected before training: {r['rejected']} ({100 * r['rejected_fraction']:.0f}% of the decided "
             f"trials); wall time per rejected trial: median {r['rejected_seconds_median']:.2f} s, "
             f"max **{r['rejected_seconds_max']:.2f} s** (sampling, building the adapter, estimating, logging)"),
             "- rejected, by the estimate that decided: " + "; ".join(
                 f"{level} {g['count']} (max {g['max_seconds']:.2f} s)" for level, g in r["rejected_by_level"].items()),
             (f"- search wall time: {r['search_wall_seconds']:.0f} s, of which {r['tracer_warm_up_seconds'] or 0:.1f} s "
             "warming the tracer up before the first trial (one-block forward and backward of each method at "
             "each micro-batch size, and once on the meta device)"), "",
             ("How a trial is decided (autopeft/budget.py): the analytic estimate rejects only above 1.5x the budget; "
             "each trace calibrates the analytic estimate of its family (the same method, training settings and "
             "method choices, other sizes), which then rejects above 1.2x the budget; a configuration that could be over the "
             "budget gets quick estimates of its first two and three blocks grown to full depth, first the forward "
             "pass alone (extrapolated-forward), then forward and backward (extrapolated), each rejecting "
             "above 1.03x (traced on the meta device where it runs as on the CPU, else on fake tensors); anything else is traced in full; estimates are "
             "remembered per memory-relevant configuration. Admitted trials are always traced in full."), "",
             ("| trial | state | method | micro-batch | optimizer | checkpointing | estimate (level) | measured | "
             "measured / budget | seconds |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["trials"]:
        est = f"{format_bytes(t['estimate'])} ({t['estimate_level']})" if t["estimate"] else "—"
        measured = format_bytes(t["measured"]) if t["measured"] else "—"
        ratio = f"{t['measured'] / r['budget_bytes']:.3f}" if t["measured"] else "—"
        seconds = f"{t['seconds']:.2f}" if t["seconds"] is not None else "—"
        lines.append(f"| {t['number']} | {t['state']} | {t['method']} | {t['micro_batch_size']} | {t['optimizer']} | "
                     f"{t['gradient_checkpointing']} | {est} | {measured} | {ratio} | {seconds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
