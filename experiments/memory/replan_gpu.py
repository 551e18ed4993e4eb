"""Planning for a GPU from a CPU-only machine, checked against figures measured on the GPU.

Reads gpu_results.json (written by gpu_check.py on a CUDA machine: torch.cuda.max_memory_allocated per
configuration) and recomputes, here and without a GPU, the estimate a CPU-only machine makes for that GPU
(`estimate_traced(..., device="cuda")`, traced on the CPU). Writes gpu_replanned.json and prints a table.
Package versions may differ between the two machines; both are recorded.

Run from the repository root:  .venv/bin/python experiments/memory/replan_gpu.py   (about a minute)
"""

from __future__ import annotations

import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import gpu_check

from autopeft import memory, methods
from autopeft.train import TrainSettings


def main() -> None:
    import peft
    import transformers

    warnings.simplefilter("ignore")
    measured = json.loads((HERE / "gpu_results.json").read_text())
    by_label = {row["label"]: row for row in measured["rows"] if "measured" in row}
    models: dict[str, torch.nn.Module] = {}
    rows = []
    for model_name, method, overrides, optimizer, precision, checkpointing, seq_len, batch in gpu_check.CONFIGS:
        label = f"{model_name} {method} {optimizer} {precision}{' ckpt' if checkpointing else ''} s{seq_len}xb{batch}"
        if label not in by_label:
            continue
        settings = TrainSettings(learning_rate=1e-4, optimizer=optimizer, precision=precision,
                                 micro_batch_size=batch, gradient_checkpointing=checkpointing)
        estimate = memory.estimate_traced(gpu_check._base_model(model_name, models), method,
                                          methods.get(method).resolve(overrides), settings, seq_len=seq_len,
                                          device="cuda")
        real = by_label[label]["measured"]
        rows.append({"label": label, "measured_on_gpu": real, "planned": estimate.as_dict(),
                     "error_planned": estimate.total / real - 1})
        print(f"{label:<42} measured {real / 2**20:8.1f} MiB  planned here {estimate.total / 2**20:8.1f} MiB "
              f"({rows[-1]['error_planned']:+.2%}, allocator slack {estimate.allocator / 2**20:.1f} MiB)", flush=True)
    errors = [abs(row["error_planned"]) for row in rows]
    result = {"measured_with": {**measured["versions"], "gpu": measured.get("gpu")},
              "planned_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "peft": peft.__version__, "device": "cpu"},
              "error_planned_abs_median": statistics.median(errors), "error_planned_abs_worst": max(errors),
              "rows": rows}
    (HERE / "gpu_replanned.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"median |error| {result['error_planned_abs_median']:.2%}, worst {result['error_planned_abs_worst']:.2%}")


if __name__ == "__main__":
    main()
