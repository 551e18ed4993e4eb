"""Were any of part `bounded`'s budget rejections configurations that fit? A replay, no training.

Part `bounded` (results.json) searched under `--memory-budget` at the default recipe's measured peak, and the
budget gate rejected draws before training on a quick estimate: the analytic figure far above the budget, a
calibrated one (one trace's ratio carried to its method, optimizer and precision), or one grown from a model's
first blocks. Session 33 found two of these could reject configurations whose full trace fits (calibration
carried across target modules, dropout and batch sizes; growth from block 1 read up to 2% high on MiniLM),
and changed both. This retraces, in full, every configuration the recorded run rejected, on the same model,
split and longest row, and counts those at or under the budget: rejections the current gate would admit.

Run from the repository root:  .venv/bin/python experiments/search/rejection_replay.py   (a few minutes)
Writes rejection_replay.json and rejection_replay.md next to this file.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from bench import base_config

from autopeft import search
from autopeft.config import SearchConfig, format_bytes
from autopeft.space import TrialParams, load_space

PART = "bounded"
COMMAND = ".venv/bin/python experiments/search/rejection_replay.py"


def replay_seed(row: dict) -> dict:
    """Every rejected draw of one seed's searches, traced in full against that seed's budget."""
    budget = row["memory_budget"]
    config = SearchConfig(**base_config(PART, row["seed"], Path(tempfile.mkdtemp()), None), memory_budget=budget)
    runtime = search.prepare_runtime(config, load_space(config.space))
    traced: dict[str, int] = {}  # one trace per configuration, as the gate remembers them
    rejected = []
    for strategy, result in row["strategies"].items():
        for trial in result["trials"]:
            if not trial.get("over_budget"):
                continue
            params = TrialParams.from_flat(trial["params"])
            key = json.dumps([params.method, params.method_params, params.training], sort_keys=True, default=str)
            if key not in traced:
                traced[key] = search.traced_estimate(runtime, params).total
            rejected.append({"strategy": strategy, "trial": trial["number"], "params": trial["params"],
                             "traced_bytes": traced[key], "fits": traced[key] <= budget})
    return {"seed": row["seed"], "budget_bytes": budget, "longest_row": runtime.longest_row,
            "configurations_traced": len(traced), "rejected": rejected}


def describe(params: dict) -> str:
    own = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in params.items() if k.startswith(f"{params['method']}."))
    return (f"{params['method']}({own}) {params['optimizer']} {params['precision']} micro-batch "
            f"{params['micro_batch_size']}{' ckpt' if params['gradient_checkpointing'] else ''}")


def write(seeds: list[dict], seconds: float) -> None:
    (HERE / "rejection_replay.json").write_text(json.dumps(
        {"command": COMMAND, "machine": f"{platform.machine()}, CPU only", "seconds": seconds, "seeds": seeds},
        indent=1))
    lines = ["# Part `bounded`'s budget rejections, traced in full", "",
             f"Command: `{COMMAND}` ({seconds:.0f} s; {platform.machine()}, CPU only). Each draw the recorded run",
             "(results.json, session 9's code) rejected before training, traced in full on the same model, split and",
             "longest row; 'fits' means at or under the seed's budget, the recipe's measured peak: a rejection the",
             "current gate (session 33) would not make.", "",
             "| seed | budget | strategy | rejected | of which fit | closest to the budget (traced / budget) |",
             "|---|---|---|---|---|---|"]
    for seed in seeds:
        for strategy in dict.fromkeys(r["strategy"] for r in seed["rejected"]):
            mine = [r for r in seed["rejected"] if r["strategy"] == strategy]
            closest = min(mine, key=lambda r: r["traced_bytes"])
            lines.append(f"| {seed['seed']} | {format_bytes(seed['budget_bytes'])} | {strategy} | {len(mine)} | "
                         f"{sum(r['fits'] for r in mine)} | {describe(closest['params'])}: "
                         f"{closest['traced_bytes'] / seed['budget_bytes']:.3f} |")
    fits = [(seed["seed"], r) for seed in seeds for r in seed["rejected"] if r["fits"]]
    lines += ["", (f"Rejections whose full trace fits: {len(fits)} of "
              f"{sum(len(seed['rejected']) for seed in seeds)}.")]
    lines += [f"- seed {s}, {r['strategy']} trial {r['trial']}: {describe(r['params'])}, traced "
              f"{format_bytes(r['traced_bytes'])}" for s, r in fits]
    (HERE / "rejection_replay.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    recorded = json.loads((HERE / "results.json").read_text())["parts"][PART]
    began = time.perf_counter()
    seeds = [replay_seed(row) for row in recorded]
    write(seeds, time.perf_counter() - began)
    print((HERE / "rejection_replay.md").read_text())


if __name__ == "__main__":
    main()
