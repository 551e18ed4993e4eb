"""Which PEFT method, at what cost? Every registered method at a comparable setting, same data, same steps.

For each model (packaged MiniLM + Rotten Tomatoes; packaged SmolLM2-135M with a classification head at a
shorter budget) and each method: trainable parameters (count and % of the base), seconds per optimizer step,
peak training memory of one step (live tensor bytes on the CPU, autopeft.memory.measure), validation
accuracy after the same number of steps and forgetting (1 - CKA on general text), mean and spread over
seeds. Each method gets the learning rate its family usually needs (one value, not tuned per model).

Run:  .venv/bin/python experiments/methods/bench.py [--models minilm,smollm2] [--seeds 3]
Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

from filelock import FileLock

warnings.filterwarnings("ignore")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

from autopeft import memory, methods
from autopeft.config import SearchConfig
from autopeft.search import build_model, prepare_runtime, run_trial, train_settings
from autopeft.space import TRAINING_PARAMS, TrialParams

HERE = Path(__file__).resolve().parent
LOCK = FileLock(str(HERE / ".results.lock"))
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "attention", "use_rslora": False}
# method -> (its parameters, learning rate). Comparable: rank 8 for the LoRA family (MoRA matched to
# LoRA-8's parameter count), 16 virtual tokens for prefix/prompt, a 16-wide bottleneck.
SETTINGS: dict[str, tuple[dict, float]] = {
    "lora": (LORA, 2e-3),
    "dora": (LORA, 2e-3),
    "qlora": ({**LORA, "double_quant": True, "compute_dtype": "fp32"}, 2e-3),
    "adalora": ({"init_r": 12, "target_r": 8, "alpha": 16.0, "target_modules": "attention"}, 2e-3),
    "mora": ({"r": 8, "target_modules": "attention", "compression": "rotation"}, 2e-3),
    "adapter": ({"bottleneck": 16, "placement": "both", "variant": "serial"}, 2e-3),
    "prefix": ({"num_virtual_tokens": 16}, 1e-1),
    "prompt": ({"num_virtual_tokens": 16, "init": "random"}, 3e-2),
    "ia3": ({"target_modules": "kv_ffn"}, 1e-2),
}
MODELS = {
    "minilm": {"model": "packaged:all-MiniLM-L6-v2", "max_steps": 100, "train_size": 4000, "val_size": 500,
                   "test_size": 500, "micro_batch_size": 16, "probes": ("representation_drift",)},
    "smollm2": {"model": "packaged:SmolLM2-135M-Instruct", "max_steps": 10, "train_size": 1000, "val_size": 200,
                    "test_size": 200, "micro_batch_size": 8, "probes": ("perplexity",)},
}


def training(lr: float, batch: int) -> dict:
    return {**{k: s.default for k, s in TRAINING_PARAMS.items()}, "learning_rate": lr, "micro_batch_size": batch,
            "warmup_ratio": 0.06}


def peak_bytes(runtime, params: TrialParams) -> int:
    """Live tensor bytes at the peak of a training step on a full-length batch (what the search budgets)."""
    model = build_model(runtime, params)
    settings = train_settings(params, max_steps=2, seed=0)
    return memory.measure(model, settings, seq_len=runtime.longest_row, pad_id=runtime.pad_id,
                          after_step=methods.get(params.method).after_step)


def one_model(name: str, seeds: int, only: set[str] | None) -> list[dict]:
    spec = dict(MODELS[name])
    batch = spec.pop("micro_batch_size")
    config = SearchConfig(**spec, max_length=64, artifacts_dir=str(HERE / ".cache"))
    runtime = prepare_runtime(config)
    rows = []
    for method in methods.names():
        if method not in SETTINGS or (only and method not in only):
            continue
        own, lr = SETTINGS[method]
        params = TrialParams(method, methods.get(method).resolve(own), training(lr, batch))
        problem = methods.get(method).problem(runtime.base_model)
        if problem:
            rows.append({"model": name, "method": method, "skipped": problem})
            continue
        try:
            rows.append(one_method(runtime, name, method, params, own, lr, seeds))
        except Exception as exc:  # noqa: BLE001 -- one broken method must not lose the others' results
            rows.append({"model": name, "method": method, "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]})
    return rows


def one_method(runtime, name: str, method: str, params: TrialParams, own: dict, lr: float, seeds: int) -> dict:
    runs = []
    for seed in range(seeds):
        began = time.perf_counter()
        outcome = run_trial(runtime, params, seed=seed)
        runs.append({"seed": seed, "val_accuracy": outcome.accuracy, "forgetting": outcome.forgetting,
                     "seconds_per_step": outcome.train.seconds / len(outcome.train.losses),
                     "wall_seconds": time.perf_counter() - began})
        print(f"{name} {method} seed {seed}: acc {outcome.accuracy:.4f} forgetting {outcome.forgetting:.4f} "
              f"{runs[-1]['seconds_per_step']:.3f} s/step", flush=True)
    return {"model": name, "method": method, "params": own, "learning_rate": lr,
            "trainable": outcome.trainable, "total": outcome.total,
            "peak_bytes": peak_bytes(runtime, params), "runs": runs}


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(results: dict) -> str:
    lines = ["# Which PEFT method, at what cost?", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
             "Mean ± sample standard deviation over 3 seeds (the seed sets the split and the training).", ""]
    for model, spec in MODELS.items():
        rows = [r for r in results["rows"] if r["model"] == model]
        if not rows:
            continue
        lines += [(f"## {model}: {spec['model']}, {spec['max_steps']} steps x batch {spec['micro_batch_size']}, "
                  f"{spec['train_size']} train / {spec['val_size']} validation rows"), "",
                  "| method | lr | trainable params | % of base | s/step (median) | peak memory (MiB) | val accuracy | forgetting |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['method']} | | | | | | skipped: {r['skipped']} | |")
                continue
            acc, acc_sd = summary([x["val_accuracy"] for x in r["runs"]])
            fgt, fgt_sd = summary([x["forgetting"] for x in r["runs"]])
            sps = statistics.median([x["seconds_per_step"] for x in r["runs"]])  # robust to one busy run
            lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['trainable']:,} | "
                         f"{100 * r['trainable'] / r['total']:.3f} | {sps:.3f} | {r['peak_bytes'] / 2**20:.0f} | "
                         f"{acc:.4f} ± {acc_sd:.4f} | {fgt:.4f} ± {fgt_sd:.4f} |")
        lines.append("")
    return "\n".join(lines) + "\n" + (HERE / "discussion.md").read_text() if (HERE / "discussion.md").exists() \
        else "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", default="", help="only these (comma-separated); other rows are kept")
    args = parser.parse_args()
    only = set(args.methods.split(",")) - {""} or None
    for name in args.models.split(","):
        fresh = one_model(name, args.seeds, only)
        with LOCK:  # several model runs may share the results file
            old = json.loads((HERE / "results.json").read_text())["rows"] if (HERE / "results.json").exists() else []
            done = {(r["model"], r["method"]) for r in fresh}
            rows = [r for r in old if (r["model"], r["method"]) not in done] + fresh
            rows.sort(key=lambda r: (list(MODELS).index(r["model"]), r["method"]))
            results = {"command": "python experiments/methods/bench.py --models minilm --seeds 3; "
                                  "python experiments/methods/bench.py --models smollm2 --seeds 3",
                       "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
                       "seeds": args.seeds, "rows": rows}
            (HERE / "results.json").write_text(json.dumps(results, indent=2))
            (HERE / "results.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
