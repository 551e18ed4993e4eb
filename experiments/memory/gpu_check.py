"""Traced peak-memory estimate vs torch.cuda.max_memory_allocated, on a CUDA machine.

Needs only torch, transformers and peft: no optuna, mlflow, bitsandbytes or packaged model weights. The
models are random-initialised from the config files in configs/ (MiniLM-L6's and SmolLM2-135M's
architectures; peak memory does not depend on weight values). For each configuration it records:
- measured: `autopeft.memory.measure(..., device="cuda")`, two real steps of `autopeft.train.fit`,
  torch.cuda.max_memory_allocated above what was allocated before the model moved to the GPU;
- traced: `estimate_traced(..., device="cuda")` with the fake tensors on the GPU (its kernels and
  autocast lists);
- planned: `estimate_traced(..., device="cuda", trace_device="cpu")`, what a CPU-only machine predicts
  for this GPU;
and, once, the cuBLAS workspace torch allocates (measured) beside the one the estimator assumes.

Run from the repository root (about a minute on an H200):
    python experiments/memory/gpu_check.py                 # writes $OUT/memory_gpu.json (else ./memory_gpu.json)
    python experiments/memory/gpu_check.py --device cpu --small   # the same path on a CPU, shrunk
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

# (model config, method, method parameters, optimizer, precision, checkpointing, sequence length, batch)
CONFIGS: list[tuple[str, str, dict[str, Any], str, str, bool, int, int]] = [
    ("minilm", "lora", {}, "adamw", "fp32", False, 128, 16),
    ("minilm", "lora", {"target_modules": "all_linear"}, "adamw", "bf16", True, 256, 16),
    ("minilm", "ia3", {}, "sgd", "bf16", False, 128, 16),
    ("minilm", "prompt", {}, "adafactor", "fp32", False, 128, 16),
    ("minilm", "dora", {}, "adamw", "bf16", False, 128, 16),
    ("smollm2", "lora", {}, "adamw", "bf16", False, 256, 4),
    ("smollm2", "lora", {"target_modules": "all_linear"}, "adamw", "fp32", True, 256, 4),
    ("smollm2", "ia3", {}, "sgd", "fp32", False, 128, 4),
    ("smollm2", "dora", {}, "adamw", "bf16", True, 256, 4),
    ("smollm2", "prompt", {}, "adamw", "bf16", False, 256, 4),
]


def _imports_available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(name) is not None
            for name in ("optuna", "mlflow", "bitsandbytes", "pandas", "peft", "transformers")}


def _stand_in_for_pandas() -> str | None:
    """autopeft.data imports pandas at module level (autopeft.train imports autopeft.data) but the
    training step never calls it: a placeholder lets the step run where pandas is not installed."""
    if importlib.util.find_spec("pandas") is not None:
        return None
    sys.modules["pandas"] = types.ModuleType("pandas")
    return "pandas is not installed here: a placeholder module stood in for autopeft.data's unused import"


def _base_model(name: str, cache: dict[str, torch.nn.Module]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if name not in cache:
        values = {k: v for k, v in json.loads((HERE / "configs" / f"{name}.json").read_text()).items()
                  if not k.startswith("_")}
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.num_labels = 2
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        cache[name] = model
    return cache[name]


def _workspace(device: torch.device) -> int:
    """What cuBLAS keeps allocated after one forward and backward matmul: its per-thread workspaces."""
    torch.cuda.synchronize(device)
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    x = torch.randn(64, 64, device=device, requires_grad=True)
    (x @ x).sum().backward()
    del x
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) - before


def run(config: tuple, device: torch.device, models: dict[str, torch.nn.Module], small: bool) -> dict[str, Any]:
    import copy

    from autopeft import adapter_io, memory, methods
    from autopeft.methods import MethodContext
    from autopeft.train import TrainSettings

    model_name, method, overrides, optimizer, precision, checkpointing, seq_len, batch = config
    if small:
        seq_len, batch = max(16, seq_len // 8), 2
    base = _base_model(model_name, models)
    params = methods.get(method).resolve(overrides)
    settings = TrainSettings(learning_rate=1e-4, optimizer=optimizer, precision=precision, micro_batch_size=batch,
                             gradient_checkpointing=checkpointing)
    label = f"{model_name} {method} {optimizer} {precision}{' ckpt' if checkpointing else ''} s{seq_len}xb{batch}"
    row: dict[str, Any] = {"label": label}
    estimates = {"traced": {}} | ({"planned": {"trace_device": "cpu"}} if device.type == "cuda" else {})
    for name, extra in estimates.items():
        try:  # one failure must not cost the other figures: the GPU time is scarce
            estimate = memory.estimate_traced(base, method, params, settings, seq_len=seq_len, device=device, **extra)
            row[name] = estimate.as_dict()
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_failed"] = f"{type(exc).__name__}: {exc}"[:500]
    model = copy.deepcopy(base)
    for param in model.parameters():
        param.requires_grad_(True)
    model = adapter_io.attach(model, method, params, MethodContext("SEQ_CLS", 150))
    start = time.perf_counter()
    try:
        row["measured"] = memory.measure(model, settings, seq_len=seq_len, device=device)
    except Exception as exc:  # noqa: BLE001
        row["measure_failed"] = f"{type(exc).__name__}: {exc}"[:500]
    row["measure_seconds"] = time.perf_counter() - start
    for name in estimates:
        if name in row and "measured" in row:
            row[f"error_{name}"] = row[name]["total"] / row["measured"] - 1
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description="traced memory estimate vs measured peak on a GPU")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="shrink sequence and batch (a CPU smoke run)")
    parser.add_argument("--limit", type=int, default=len(CONFIGS), help="run only the first N configurations")
    parser.add_argument("--out", default=str(Path(os.environ.get("OUT", ".")) / "memory_gpu.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    available = _imports_available()
    notes = [note for note in [_stand_in_for_pandas()] if note]
    from autopeft import memory, methods  # noqa: F401 -- the import check below is about these two

    heavy = [name for name in ("optuna", "mlflow", "bitsandbytes") if name in sys.modules]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    import peft
    import transformers

    result: dict[str, Any] = {
        "device": str(device), "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                           "peft": peft.__version__, "python": sys.version.split()[0]},
        "available_packages": available, "imported_by_autopeft_memory_and_methods": heavy, "notes": notes,
    }
    if device.type == "cuda":
        result["gpu"] = {"name": torch.cuda.get_device_name(device),
                         "capability": list(torch.cuda.get_device_capability(device))}
        result["cublas_workspace"] = {"measured": _workspace(device), "assumed": memory.cuda_workspace_bytes(device)}
    models: dict[str, torch.nn.Module] = {}
    rows = []
    for config in CONFIGS[:args.limit]:
        began = time.perf_counter()
        row = run(config, device, models, args.small)
        row["seconds"] = time.perf_counter() - began
        rows.append(row)
        print(_line(row), flush=True)
        _write(args.out, result, rows, start)  # after every row: a run cut short still leaves its figures
    print(json.dumps({k: v for k, v in _write(args.out, result, rows, start).items() if k != "rows"}, indent=2))
    print(f"wrote {args.out}")


def _line(row: dict[str, Any]) -> str:
    figures = [f"measured {row['measured'] / 2**20:9.1f} MiB" if "measured" in row else "measure FAILED"]
    for name in ("traced", "planned"):
        if f"error_{name}" in row:
            figures.append(f"{name} {row[f'error_{name}']:+.2%}")
        elif f"{name}_failed" in row:
            figures.append(f"{name} FAILED ({row[f'{name}_failed'][:80]})")
    return f"{row['label']:<45} {'  '.join(figures)}  ({row['seconds']:.0f} s)"


def _write(out: str, result: dict[str, Any], rows: list[dict[str, Any]], start: float) -> dict[str, Any]:
    result["rows"] = rows
    for key in ("error_traced", "error_planned"):
        errors = [abs(r[key]) for r in rows if key in r]
        if errors:
            result[f"{key}_abs_median"], result[f"{key}_abs_worst"] = statistics.median(errors), max(errors)
    result["wall_seconds"] = time.perf_counter() - start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
