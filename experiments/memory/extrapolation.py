"""The extrapolated estimates (forward and backward, or the forward pass only, of 2 and 3 blocks, grown
linearly) against the full trace.

The budget gate uses `autopeft.memory.estimate_extrapolated` as a quick estimate to reject configurations
before the full trace: the forward pass alone first, then forward and backward. This
checks how close both come to `estimate_traced` on every configuration of the estimator benchmark whose
model has at least 6 blocks (MiniLM, SmolLM2; the tiny models have 2 and are always traced in full), plus a
Llama-2-7B configuration, and how much time they save. Writes extrapolation.json and extrapolation.md next
to this file.

Run from the repository root:  .venv/bin/python experiments/memory/extrapolation.py   (a few minutes)
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import CASES, Case, Models

from autopeft import memory, methods
from autopeft.config import format_bytes
from autopeft.train import TrainSettings

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python experiments/memory/extrapolation.py"
LLAMA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 4096, "pad_token_id": 0}


def compare(model, case: Case) -> dict:
    params = methods.get(case.method).resolve(case.params)
    settings = TrainSettings(learning_rate=1e-4, optimizer=case.optimizer, precision=case.precision,
                             micro_batch_size=case.batch, gradient_checkpointing=case.checkpointing)
    options = {"seq_len": case.seq_len, "task_type": case.task}
    full = memory.estimate_traced(model, case.method, params, settings, **options)
    row = {"label": case.label, "traced": full.total, "traced_seconds": full.seconds, "peak_at": full.peak_at,
           "checkpointing": case.checkpointing}
    # The gate's way (the meta device where the step allows it) and the fake-tensor-only baseline, side by side.
    for prefix, meta in (("", True), ("fake_", False)):
        quick = memory.estimate_extrapolated(model, case.method, params, settings, **options, meta=meta)
        forward = memory.estimate_extrapolated(model, case.method, params, settings, **options, through="forward",
                                               meta=meta)
        if quick is None:
            return {**row, "extrapolated": None, "why": "fewer than 4 blocks"}
        row.update({f"{prefix}extrapolated": quick.total, f"{prefix}extrapolated_seconds": quick.seconds,
                    f"{prefix}error": quick.total / full.total - 1, f"{prefix}forward": forward.total,
                    f"{prefix}forward_seconds": forward.seconds,
                    f"{prefix}forward_error": forward.total / full.total - 1})
    return row


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    from transformers import AutoConfig

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        models = Models(Path(folder))
        # One warm-up trace: the first fake-tensor trace of a process pays for imports and dispatch caches.
        memory.warm_up(models.get("MiniLM"))
        for case in [c for c in CASES if not c.model.startswith("tiny-")]:
            row = compare(models.get(case.model), case)
            rows.append(row)
            print(row, flush=True)
    big = Case("Llama-2-7B-config", "lora", {}, "adamw", "bf16", True, seq_len=512, batch=4)
    rows.append(compare(AutoConfig.for_model(**LLAMA_7B), big))
    print(rows[-1], flush=True)
    done = [r for r in rows if r["extrapolated"] is not None]
    errors = [abs(r["error"]) for r in done]
    speed = [r["extrapolated_seconds"] / r["traced_seconds"] for r in done]
    plain = [r for r in done if not r["checkpointing"]]  # where the forward pass alone shows the whole peak
    summary = {"configurations": len(rows), "extrapolated": len(done),
               "max_abs_error": max(errors), "median_abs_error": statistics.median(errors),
               "median_time_ratio": statistics.median(speed),
               "forward_without_checkpointing": {
                   "configurations": len(plain),
                   "median_abs_error": statistics.median(abs(r["forward_error"]) for r in plain),
                   "max_error": max(r["forward_error"] for r in plain),
                   "min_error": min(r["forward_error"] for r in plain),
                   "median_time_ratio": statistics.median(r["forward_seconds"] / r["traced_seconds"] for r in plain)},
               "forward_with_checkpointing_min_error": min((r["forward_error"] for r in done if r["checkpointing"]),
                                                           default=None),
               "fake_only": {
                   "median_abs_error": statistics.median(abs(r["fake_error"]) for r in done),
                   "max_abs_error": max(abs(r["fake_error"]) for r in done),
                   "forward_median_abs_error": statistics.median(abs(r["fake_forward_error"]) for r in plain),
                   "median_seconds": statistics.median(r["fake_extrapolated_seconds"] for r in done),
                   "forward_median_seconds": statistics.median(r["fake_forward_seconds"] for r in done),
                   "forward_max_seconds": max(r["fake_forward_seconds"] for r in done)},
               "median_seconds": statistics.median(r["extrapolated_seconds"] for r in done),
               "forward_median_seconds": statistics.median(r["forward_seconds"] for r in done),
               "forward_max_seconds": max(r["forward_seconds"] for r in done)}
    result = {"command": COMMAND, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "summary": summary, "rows": rows}
    (HERE / "extrapolation.json").write_text(json.dumps(result, indent=2) + "\n")
    fwd = summary["forward_without_checkpointing"]
    lines = ["# Extrapolated vs full traced estimate", "", f"Command: `{COMMAND}`  ", (f"Date: {result['date']}, "
             f"torch {torch.__version__}, 2 CPU threads"), "",
             (f"{len(done)} of {len(rows)} configurations extrapolated; |error| median "
             f"{summary['median_abs_error']:.2%}, max {summary['max_abs_error']:.2%}; time of the two short traces "
             f"/ the full trace: median {summary['median_time_ratio']:.2f}."), "",
             (f"Forward pass only (the gate's first quick estimate), on the "
             f"{fwd['configurations']} configurations without checkpointing: |error| median "
             f"{fwd['median_abs_error']:.2%}, from {fwd['min_error']:+.2%} to {fwd['max_error']:+.2%}; time / the "
             f"full trace: median {fwd['median_time_ratio']:.2f}. With checkpointing the peak moves into the "
             f"backward pass's recomputation and the forward pass alone reads as low as "
             f"{summary['forward_with_checkpointing_min_error']:+.0%}: still decisive far above the budget, "
             "otherwise the gate goes on to forward and backward."), "",
             ("Where the traces run: on the meta device where the step allows it (fp32, not qlora, no value read: "
             "`memory.traced._quick_trace`), else on fake tensors. Against fake tensors everywhere (the baseline, same "
             f"run): seconds of the forward-only estimate median {summary['forward_median_seconds']:.2f} against "
             f"{summary['fake_only']['forward_median_seconds']:.2f}, max {summary['forward_max_seconds']:.2f} "
             f"against {summary['fake_only']['forward_max_seconds']:.2f}; forward and backward median "
             f"{summary['median_seconds']:.2f} s against {summary['fake_only']['median_seconds']:.2f} s. Fake "
             f"tensors only: |error| median {summary['fake_only']['median_abs_error']:.2%}, max "
             f"{summary['fake_only']['max_abs_error']:.2%}; forward only without checkpointing median "
             f"{summary['fake_only']['forward_median_abs_error']:.2%}."),
             "", ("| configuration | full trace | extrapolated | error | forward only (error) | full s | "
             "extrapolated s | forward only s | fake only: error / forward error | fake only: extrapolated s / "
             "forward s | peak in |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["extrapolated"] is None:
            lines.append(f"| {r['label']} | {format_bytes(r['traced'])} | — ({r['why']}) | | | "
                         f"{r['traced_seconds']:.2f} | | | | | {r['peak_at']} |")
            continue
        lines.append(f"| {r['label']} | {format_bytes(r['traced'])} | {format_bytes(r['extrapolated'])} | "
                     f"{r['error']:+.2%} | {format_bytes(r['forward'])} ({r['forward_error']:+.2%}) | "
                     f"{r['traced_seconds']:.2f} | {r['extrapolated_seconds']:.2f} | {r['forward_seconds']:.2f} | "
                     f"{r['fake_error']:+.2%} / {r['fake_forward_error']:+.2%} | "
                     f"{r['fake_extrapolated_seconds']:.2f} / {r['fake_forward_seconds']:.2f} | {r['peak_at']} |")
    (HERE / "extrapolation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
