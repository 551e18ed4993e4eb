"""What holding evaluation batches to one training micro-batch (under a memory budget) costs on the CPU.

A trial under `--memory-budget` evaluates in batches of at most one training micro-batch's padded positions
(`search.eval_positions`, measured on a GPU in gpu_trial_memory.md); before, in 128-row batches. This times
a trial's final evaluation (validation accuracy, then the study's default probes) both ways, twice each,
alternating, on the packaged models with a LoRA adapter attached, and checks the accuracy is unchanged.

    .venv/bin/python experiments/search/eval_batch_cost.py   # writes eval_batch_cost.json / .md here
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from autopeft import methods, search
from autopeft.config import SearchConfig
from autopeft.data import eval_positions_limited
from autopeft.space import TrialParams

CASES = [  # (name, search options, the trial's micro-batch: the bench's spaces')
    ("MiniLM, 1000 validation rows, micro-batch 16", {"model": "packaged:all-MiniLM-L6-v2", "val_size": 1000}, 16),
    ("SmolLM2 causal LM, 300 validation rows, micro-batch 4",
     {"model": "packaged:SmolLM2-135M-Instruct", "task_type": "causal_lm", "probes": ("perplexity",),
      "val_size": 300, "max_length": 48}, 4),
]


def timed(runtime: search.Runtime, model, positions: int | None) -> dict:
    with eval_positions_limited(positions):
        started = time.perf_counter()
        accuracy = runtime.evaluate(model, runtime.validation, runtime.device)
        scored = time.perf_counter()
        runtime.probes.score(model, runtime.device, measured={"val_accuracy": accuracy})
    return {"positions": positions, "validation_seconds": scored - started,
            "probe_seconds": time.perf_counter() - scored, "accuracy": accuracy}


def main() -> None:
    rows = []
    for name, options, micro_batch in CASES:
        config = SearchConfig(**options, train_size=1000, test_size=40, study="eval-cost",
                              artifacts_dir="/tmp/autopeft-eval-cost")
        runtime = search.prepare_runtime(config)
        params = TrialParams("lora", methods.get("lora").resolve({"r": 8, "alpha": 16, "target_modules": "qv"}),
                             search.params_defaults())
        model = search.build_model(runtime, params).eval()
        limit = micro_batch * runtime.longest_row
        for positions in (None, limit, None, limit):
            rows.append({"case": name, **timed(runtime, model, positions)})
    (HERE / "eval_batch_cost.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Evaluation held to a micro-batch: its cost on the CPU", "",
             ("Command: `.venv/bin/python experiments/search/eval_batch_cost.py` (2 CPU threads). A trial's final "
              "evaluation, validation accuracy then the default probes, with 128-row batches and held to one "
              "training micro-batch's positions (micro-batch x the longest training row), alternating, twice each."),
             "", "| case | batches | validation s | probes s | accuracy |", "|---|---|---|---|---|"]
    for row in rows:
        batches = "128 rows" if row["positions"] is None else f"at most {row['positions']} positions"
        lines.append(f"| {row['case']} | {batches} | {row['validation_seconds']:.2f} | {row['probe_seconds']:.2f} | "
                     f"{row['accuracy']:.4f} |")
    (HERE / "eval_batch_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
