"""The search end to end on a CUDA machine: what a user with a GPU runs, at each precision.

Every other figure in experiments/search comes from a CPU. This runs the real `autopeft search` and
`autopeft export` commands where the search trains on CUDA, and reads back from the study what each trial did:
its precision, method, measured CUDA peak beside the estimate the budget held it to, speed, fp16 overflow
steps, and the reason of every trial that failed or was rejected. It also scores each forgetting probe on CUDA
(the base model against itself must forget exactly 0, a perturbed copy more).

The models are MiniLM-L6's and SmolLM2-135M's architectures, randomly initialised (their weights are too
large to carry to a borrowed GPU machine), with their real tokenizers; the task and probe texts are the
packaged ones. So accuracies here say nothing about quality (CPU parts measure that); the run checks that
every path works on the GPU and what it costs there.

Run from the repository root on a CUDA machine:
    python experiments/search/gpu_check.py --tokenizers DIR   # DIR: minilm/, smollm2/ (config, tokenizer)
Writes gpu_check.json and gpu_check_logs.txt to $OUT (else ./gpu_check_out).
    python experiments/search/gpu_check.py --render gpu_check.json   # writes gpu_check.md beside this file
    python experiments/search/gpu_check.py --tokenizers DIR --small   # 2-layer models, on the CPU if no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("OUT") or "gpu_check_out")
LOG = OUT / "gpu_check_logs.txt"  # written after each command, so a run cut off by its time limit says where
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import fmt, mib  # (the search bench's table cells)

from autopeft import probes


def space(methods: str, learning_rate: str, micro_batch_size: int, settings: str) -> str:
    """A space over `methods` whose training settings offer every precision (the point of the check)."""
    return (f"method: [{methods}]\ntraining:\n  learning_rate: {{{learning_rate}, log: true}}\n"
            "  optimizer: [adamw, adafactor]\n  precision: [fp32, bf16, fp16]\n  grad_accum_steps: [1, 2]\n"
            f"  micro_batch_size: {micro_batch_size}\n  warmup_ratio: 0.06\n  scheduler: linear\n"
            f"methods:\n{settings}")


ENCODER_SPACE = space("lora, dora, ia3, adapter, prompt", "low: 5.0e-4, high: 5.0e-3", 16, """\
  lora: {r: [8, 16], alpha: [16, 32], target_modules: [qv, all_linear]}
  dora: {r: [8, 16], alpha: [16, 32], target_modules: [qv, all_linear]}
  ia3: {target_modules: [kv, kv_ffn], learning_rate: {low: 3.0e-3, high: 3.0e-2, log: true}}
  adapter: {bottleneck: [16, 64], placement: [ffn, both], variant: [serial, parallel]}
  prompt: {num_virtual_tokens: [10, 20], learning_rate: {low: 3.0e-3, high: 3.0e-2, log: true}}
""")
CAUSAL_SPACE = space("lora, ia3", "low: 1.0e-4, high: 3.0e-3", 8, """\
  lora: {r: [8, 16], alpha: [16, 32], target_modules: [qv, all_linear]}
  ia3: {target_modules: [kv, kv_ffn], learning_rate: {low: 1.0e-3, high: 3.0e-2, log: true}}
""")
# (study, model folder, space, extra search options). Timeouts keep the whole check near three minutes.
SEARCHES = [
    ("encoder", "minilm", ENCODER_SPACE,
     ["--trials", "10", "--max-steps", "100", "--train-size", "2000", "--val-size", "500", "--test-size", "500",
      "--memory-budget", "400MiB", "--timeout", "60"]),
    ("causal", "smollm2", CAUSAL_SPACE,
     ["--task-type", "causal_lm", "--probes", "perplexity,factual_recall", "--trials", "6", "--max-steps", "32",
      "--train-size", "1000", "--val-size", "200", "--test-size", "200", "--timeout", "50"]),
]
TRIAL_KEYS = ("val_accuracy", "forgetting", "memory_estimate_bytes", "memory_estimate_level", "memory_measured_bytes",
              "memory_estimate_error", "wall_seconds", "train_seconds", "eval_seconds", "train_tokens_per_second",
              "fp16_overflow_steps", "final_train_loss", "trainable_params", "fail_reason", "prune_reason")


def build_model(tokenizers: Path, name: str, folder: Path, small: bool) -> None:
    """A random model of the named architecture, saved with its real tokenizer (seeded: reruns match)."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tokenizers / name, **({"num_hidden_layers": 2} if small else {}))
    auto = AutoModelForCausalLM if name == "smollm2" else AutoModel
    auto.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizers / name).save_pretrained(folder)


def autopeft(args: list[str], log: list[str]) -> tuple[int, float]:
    started = time.perf_counter()
    LOG.write_text("\n".join([*log, f"$ autopeft {' '.join(args)}  (running)"]))  # kept if the run is cut off
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # carried packages too
    done = subprocess.run([sys.executable, "-m", "autopeft.cli", *args], capture_output=True, text=True, check=False,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    seconds = time.perf_counter() - started
    log += [f"$ autopeft {' '.join(args)}", done.stdout[-6000:], done.stderr[-4000:],
            f"exit {done.returncode}, {seconds:.1f} s", ""]
    LOG.write_text("\n".join(log))
    return done.returncode, seconds


def trial_rows(storage: str, study: str) -> list[dict]:
    rows = []
    for trial in optuna.load_study(study_name=study, storage=storage).trials:
        params = trial.user_attrs.get("params", {})
        row = {"number": trial.number, "state": trial.state.name, "method": params.get("method"),
               "precision": params.get("precision"), "optimizer": params.get("optimizer")}
        row.update({key: trial.user_attrs[key] for key in TRIAL_KEYS if key in trial.user_attrs})
        rows.append(row)
    return rows


def search_and_export(work: Path, models: Path, log: list[str], small: bool) -> dict:
    results = {}
    for study, model, space, options in SEARCHES:
        if small:  # a check of this script: few short trials
            options = [*options, "--trials", "2", "--max-steps", "4", "--train-size", "200", "--val-size", "40",
                       "--test-size", "40"]
        if small:  # bf16 and fp16 crawl on a CPU; the GPU run is the one that searches them
            space = space.replace("precision: [fp32, bf16, fp16]", "precision: fp32")
        (work / f"{study}.yaml").write_text(space)
        storage = f"sqlite:///{work / 'studies.db'}"
        common = ["--study", study, "--storage", storage]
        code, seconds = autopeft(["search", "--model", str(models / model), "--space", str(work / f"{study}.yaml"),
                                  *common, "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
                                  "--artifacts-dir", str(work / "artifacts"), "--seed", "0", *options], log)
        export_code, export_seconds = autopeft(["export", *common, "--out", str(work / f"export-{study}")], log)
        exported = work / f"export-{study}"
        results[study] = {"exit": code, "seconds": seconds, "export_exit": export_code,
                          "export_seconds": export_seconds, "trials": trial_rows(storage, study),
                          "export_files": sorted(p.name for p in exported.iterdir()) if exported.exists() else []}
    return results


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with noise on every weight: a probe must see it forget."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.5 * weight.std() * torch.randn(weight.shape, generator=generator).to(weight.device))
    return model


def probe_checks(models: Path) -> dict:
    """Each forgetting probe on CUDA: the base model against itself, and a perturbed copy."""
    cuda = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    checks = {}
    for name, folder, build in (("linear_probe", "minilm", probes.LinearProbe),
                                ("perplexity", "smollm2", probes.PerplexityIncrease),
                                ("factual_recall", "smollm2", probes.FactualRecall)):
        auto = AutoModelForCausalLM if folder == "smollm2" else AutoModel
        tokenizer = AutoTokenizer.from_pretrained(models / folder)
        probe = build(tokenizer)
        base = auto.from_pretrained(models / folder).to(cuda).eval()
        probe.fit_base(base, cuda)
        same = probe.score(base, cuda)
        changed = probe.score(perturbed(base), cuda)
        checks[name] = {"base": same, "perturbed": changed}
    return checks


def level(row: dict) -> str:
    return f" ({row['memory_estimate_level']})" if row.get("memory_estimate_level") else ""


def render(report: dict) -> str:
    lines = [f"# The search on a GPU ({report['gpu']})", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", "",
             ("est. MiB: the trial's recorded estimate, traced where the search has a memory budget (the encoder "
              "search), else the analytic first guess (the causal search); measured MiB: "
              "`torch.cuda.max_memory_allocated` during the trial."), ""]
    for study, result in report.get("searches", {}).items():
        lines += [(f"## {study}: `autopeft search` exit {result['exit']} in {result['seconds']:.0f} s, "
                   f"`autopeft export` exit {result['export_exit']} in {result['export_seconds']:.0f} s"), "",
                  ("| trial | state | method | precision | optimizer | val acc | forgetting | est. MiB | "
                   "measured MiB | est. error | train s | tokens/s | fp16 overflow steps | reason |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in result["trials"]:
            reason = (row.get("fail_reason") or row.get("prune_reason") or "").replace("|", "/")
            lines.append(f"| {row['number']} | {row['state']} | {row['method']} | {row['precision']} | "
                         f"{row['optimizer']} | {fmt(row.get('val_accuracy'), '.3f')} | "
                         f"{fmt(row.get('forgetting'), '.4f')} | "
                         f"{mib(row.get('memory_estimate_bytes'))}{level(row)} | {mib(row.get('memory_measured_bytes'))} | "
                         f"{fmt(row.get('memory_estimate_error'), '+.1%')} | {fmt(row.get('train_seconds'), '.1f')} | "
                         f"{fmt(row.get('train_tokens_per_second'), '.0f')} | "
                         f"{row.get('fp16_overflow_steps', '—')} | "
                         f"{reason[:160]} |")
        lines.append("")
    if "probes" in report:
        lines += ["## Forgetting probes on CUDA: the base model against itself, and a perturbed copy", "",
                  "| probe | base: scores | perturbed: scores |", "|---|---|---|"]
        for name, check in report["probes"].items():
            show = lambda scores: ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            lines.append(f"| {name} | {show(check['base'])} | {show(check['perturbed'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizers", type=Path)
    parser.add_argument("--render", type=Path, help="a gpu_check.json: write gpu_check.md from it, run nothing")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autopeft-gpu-check"))
    parser.add_argument("--small", action="store_true", help="2-layer models and tiny searches: check the script")
    args = parser.parse_args()
    if args.render:
        (Path(__file__).parent / "gpu_check.md").write_text(render(json.loads(args.render.read_text())))
        return
    if args.tokenizers is None:
        parser.error("--tokenizers is required")
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # `timeout` stops it: still write what it has
    models = args.work / "models"
    for name in ("minilm", "smollm2"):
        build_model(args.tokenizers, name, models / name, args.small)
    log: list[str] = []
    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
              "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                           **{m: __import__(m).__version__ for m in ("transformers", "peft", "optuna", "mlflow")}}}
    try:
        report["searches"] = search_and_export(args.work, models, log, args.small)
        report["probes"] = probe_checks(models)
    finally:
        (OUT / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        LOG.write_text("\n".join(log))
    print(json.dumps(report, indent=1, default=str)[-6000:])


if __name__ == "__main__":
    main()
