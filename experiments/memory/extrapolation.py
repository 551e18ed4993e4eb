"""The extrapolated estimate (forward and backward of 1 and 2 blocks, grown linearly) against the full trace.

The budget gate uses `autopeft.memory.estimate_extrapolated` as a quick estimate to reject configurations
before the full trace. This checks how close it comes to `estimate_traced` on every configuration of the estimator benchmark whose model has at
least 4 blocks (MiniLM, SmolLM2; the tiny models have 2 and are always traced in full), plus a Llama-2-7B
configuration, and how much time it saves. Writes extrapolation.json and extrapolation.md next to this file.

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

from bench import CASES, Case, Models  # noqa: E402

from autopeft import memory, methods  # noqa: E402
from autopeft.config import format_bytes  # noqa: E402
from autopeft.train import TrainSettings  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = ".venv/bin/python experiments/memory/extrapolation.py"
LLAMA_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=4096, pad_token_id=0)


def compare(model, case: Case) -> dict:
    params = methods.get(case.method).resolve(case.params)
    settings = TrainSettings(learning_rate=1e-4, optimizer=case.optimizer, precision=case.precision,
                             micro_batch_size=case.batch, gradient_checkpointing=case.checkpointing)
    options = dict(seq_len=case.seq_len, task_type=case.task)
    full = memory.estimate_traced(model, case.method, params, settings, **options)
    quick = memory.estimate_extrapolated(model, case.method, params, settings, **options)
    row = {"label": case.label, "traced": full.total, "traced_seconds": full.seconds, "peak_at": full.peak_at}
    if quick is None:
        return {**row, "extrapolated": None, "why": "the peak moved phase between 1 and 2 blocks"}
    return {**row, "extrapolated": quick.total, "extrapolated_seconds": quick.seconds,
            "error": quick.total / full.total - 1}


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
    summary = {"configurations": len(rows), "extrapolated": len(done),
               "max_abs_error": max(errors), "median_abs_error": statistics.median(errors),
               "median_time_ratio": statistics.median(speed)}
    result = {"command": COMMAND, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "summary": summary, "rows": rows}
    (HERE / "extrapolation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Extrapolated vs full traced estimate", "", f"Command: `{COMMAND}`  ", f"Date: {result['date']}, "
             f"torch {torch.__version__}, 2 CPU threads", "",
             f"{len(done)} of {len(rows)} configurations extrapolated; |error| median "
             f"{summary['median_abs_error']:.2%}, max {summary['max_abs_error']:.2%}; time of the two short traces "
             f"/ the full trace: median {summary['median_time_ratio']:.2f}.", "",
             "| configuration | full trace | extrapolated | error | full s | extrapolated s | peak in |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["extrapolated"] is None:
            lines.append(f"| {r['label']} | {format_bytes(r['traced'])} | — ({r['why']}) | | "
                         f"{r['traced_seconds']:.2f} | | {r['peak_at']} |")
            continue
        lines.append(f"| {r['label']} | {format_bytes(r['traced'])} | {format_bytes(r['extrapolated'])} | "
                     f"{r['error']:+.2%} | {r['traced_seconds']:.2f} | {r['extrapolated_seconds']:.2f} | "
                     f"{r['peak_at']} |")
    (HERE / "extrapolation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
