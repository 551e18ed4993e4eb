"""Where a search trial's CUDA peak comes from: the estimate, `memory.measure`, and the trial's phases.

The full-size GPU check (gpu_check.md) found the encoder search's trials, held by a memory budget to their
traced estimate, peaking 14-40% above it on CUDA, while the memory bench's GPU check
(experiments/memory/gpu_results.json) had the estimate within 0.2% (median) of `memory.measure`. A trial
runs more than `measure` does: a mid-training evaluation, then the final evaluation and the probes. This
splits one trial's peak into what the process held before its model was built, the training steps, the
mid-training evaluation, and the final evaluation and probes, beside the estimate and `measure`; each case
twice, with evaluation batches of 128 rows (as trials ran before) and held to one training micro-batch's
positions (as a trial under a budget now runs, `search.eval_positions`).

Run from the repository root on a CUDA machine (random-initialised models, real tokenizers, as gpu_check.py):
    python experiments/search/gpu_trial_memory.py --tokenizers DIR --steps 16  # writes $OUT/gpu_trial_memory.json
    python experiments/search/gpu_trial_memory.py --render FILE                # writes gpu_trial_memory.md here
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import build_model  # (random model of the architecture, real tokenizer)

from autopeft import memory, methods, search
from autopeft.config import SearchConfig
from autopeft.data import eval_positions_limited
from autopeft.space import TrialParams
from autopeft.train import fit

# (name, model folder, search options, method, method params, training settings): the GPU check's trials.
CASES = [
    ("encoder lora fp32", "minilm", {}, "lora", {"r": 8, "alpha": 16, "target_modules": "qv"},
     {"precision": "fp32", "micro_batch_size": 16}),
    ("encoder prompt fp16", "minilm", {}, "prompt", {"num_virtual_tokens": 20},
     {"precision": "fp16", "micro_batch_size": 16}),
    ("causal ia3 bf16", "smollm2", {"task_type": "causal_lm", "probes": ("perplexity", "factual_recall")}, "ia3",
     {"target_modules": "kv"}, {"precision": "bf16", "micro_batch_size": 8}),
    ("causal lora fp32", "smollm2", {"task_type": "causal_lm", "probes": ("perplexity", "factual_recall")}, "lora",
     {"r": 8, "alpha": 16, "target_modules": "qv"}, {"precision": "fp32", "micro_batch_size": 8}),
]
MIB = 2 ** 20


class Peaks:
    """CUDA peak bytes per phase (the peak counter is reset at each phase's start)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.phases, self.phase = device, {}, None

    def enter(self, phase: str | None) -> None:
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        if self.phase is not None:
            self.phases[self.phase] = max(self.phases.get(self.phase, 0), torch.cuda.max_memory_allocated(self.device))
        self.phase = phase
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0


def run_case(runtime: search.Runtime, method: str, method_params: dict, training: dict, steps: int,
             limited: bool) -> dict:
    """One trial's phases; `limited`: its evaluation batches held to one micro-batch's positions, as a trial
    under a memory budget now runs (search.eval_positions), else 128 rows each, as it ran before."""
    params = TrialParams(method, methods.get(method).resolve(method_params),
                         {**search.params_defaults(), "optimizer": "adamw", "learning_rate": 1e-4, **training})
    device = runtime.device
    estimate = search.traced_estimate(runtime, params)
    measured = memory.measure(search.build_model(runtime, params), search.train_settings(params, max_steps=2, seed=0),
                              seq_len=runtime.longest_row, device=device,
                              task_type=runtime.method_task_type, num_labels=len(runtime.task.label_names),
                              pad_id=runtime.pad_id) if device.type == "cuda" else None
    peaks = Peaks(device)
    before = peaks.allocated()
    model = search.build_model(runtime, params).to(device)
    weights = peaks.allocated() - before
    subset = runtime.validation.spread(search.INTERMEDIATE_ROWS)

    def mid_eval(step: int, trained: torch.nn.Module) -> None:
        if step == steps // 2:
            peaks.enter("mid-training evaluation")
            runtime.evaluate.progress(trained, subset, device)
            peaks.enter("training steps")

    positions = training["micro_batch_size"] * runtime.longest_row if limited else None
    with eval_positions_limited(positions):
        peaks.enter("training steps")
        result = fit(model, runtime.train, search.train_settings(params, max_steps=steps, seed=0),
                     pad_id=runtime.pad_id, device=device, loss_fn=runtime.loss_fn, on_step=mid_eval)
        peaks.enter("final evaluation and probes")
        started = time.perf_counter()
        runtime.evaluate(model, runtime.validation, device)
        runtime.probes.score(model, device, measured={"val_accuracy": 0.0})
        peaks.enter(None)
        evaluation_seconds = time.perf_counter() - started
    return {"estimate": estimate.total, "estimate_parts": estimate.parts(), "measure": measured,
            "allocated_before_trial": before, "model_on_device": weights, "phase_peaks": peaks.phases,
            "train_seconds": result.seconds, "evaluation_seconds": evaluation_seconds, "tokens_per_second": result.tokens / result.seconds,
            "seq_len": runtime.longest_row, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizers", type=Path)
    parser.add_argument("--render", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/autopeft-gpu-trial-memory"))
    args = parser.parse_args()
    if args.render:
        (Path(__file__).parent / "gpu_trial_memory.md").write_text(render(json.loads(args.render.read_text())))
        return
    out = Path(os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
              "torch": torch.__version__, "cases": {}}
    runtimes = {}
    for name, folder, options, method, method_params, training in CASES:
        if folder not in runtimes:
            build_model(args.tokenizers, folder, args.work / folder, small=False)
            config = SearchConfig(model=str(args.work / folder), train_size=400, val_size=256, test_size=40,
                                  artifacts_dir=str(args.work / "artifacts"), study=folder, **options)
            runtimes[folder] = search.prepare_runtime(config)
        for limited in (False, True):
            key = f"{name}, {'evaluation held to a micro-batch' if limited else 'evaluation in 128-row batches'}"
            report["cases"][key] = run_case(runtimes[folder], method, method_params, training, args.steps, limited)
        (out / "gpu_trial_memory.json").write_text(json.dumps(report, indent=1))
    print(render(report))


def render(report: dict) -> str:
    lines = [f"# A search trial's CUDA peak by phase ({report['gpu']}, torch {report['torch']})", "",
             ("Command: `python experiments/search/gpu_trial_memory.py --tokenizers DIR --steps 16` (MiniLM's and "
              "SmolLM2-135M's architectures, random weights, real tokenizers; 400 training rows, 256 validation "
              "rows, the study's default probes). Each column is a CUDA peak (`torch.cuda.max_memory_allocated`, "
              "reset at the phase's start), so every phase includes what the process already held: the 64 MiB "
              "of cuBLAS workspaces, which the estimate counts too. Seconds: the final evaluation and probes. "
              "Training tokens/s: over the 16 steps, so the first run of a model at a precision carries CUDA's "
              "warm-up."), "",
             ("| trial | estimate MiB | measure() MiB | held before the trial MiB | model MiB | training steps MiB | "
              "mid-training evaluation MiB | final evaluation and probes MiB | its seconds | training tokens/s |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        phase = case["phase_peaks"]
        cell = lambda v: f"{v / MIB:.0f}" if v is not None else "—"
        lines.append(f"| {name} | {cell(case['estimate'])} | {cell(case['measure'])} | "
                     f"{cell(case['allocated_before_trial'])} | {cell(case['model_on_device'])} | "
                     f"{cell(phase.get('training steps'))} | {cell(phase.get('mid-training evaluation'))} | "
                     f"{cell(phase.get('final evaluation and probes'))} | {case['evaluation_seconds']:.2f} | "
                     f"{case['tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
