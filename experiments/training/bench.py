"""autopeft vs transformers.Trainer + peft on the packaged MiniLM + Rotten Tomatoes (4000/1000/1000 split).

Two questions, measured side by side in one run on the same machine:
  A. Training throughput of one trial (non-pad tokens/s) on the same LoRA config, data and steps:
     autopeft's loop vs Trainer with the usual DataCollatorWithPadding. Median of --repeats runs each.
  B. A whole search of 6 LoRA trials x 150 steps: autopeft vs Trainer.hyperparameter_search(backend="optuna")
     with a model_init that builds the peft model (the route users take today). Wall time, best validation
     accuracy, and whether each trial built the r it sampled.

Run:  .venv/bin/python experiments/training/bench.py [--repeats 3] [--steps 60]
Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import torch

warnings.filterwarnings("ignore")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
optuna.logging.set_verbosity(optuna.logging.WARNING)

from autopeft.config import SearchConfig
from autopeft.data import load_task
from autopeft.models import resolve_model_path
from autopeft.search import prepare_runtime, run_search, run_trial
from autopeft.space import TrialParams

HERE = Path(__file__).resolve().parent
LR_RANGE = (5e-4, 5e-3)
R_CHOICES = [4, 8, 16]
ALPHA_CHOICES = [8, 16, 32]
TRIALS, STEPS, BATCH = 6, 150, 16
if os.environ.get("BENCH_QUICK"):  # a seconds-long dry run of the script itself, results not kept
    TRIALS, STEPS = 2, 5
    HERE = Path(tempfile.mkdtemp())


# ---------------------------------------------------------------- transformers.Trainer side

def hf_datasets(tokenizer):
    from datasets import Dataset

    task = load_task("packaged:rotten_tomatoes", seed=0, train_size=4000, val_size=1000, test_size=1000)

    def build(split):
        enc = tokenizer(split.texts, truncation=True, max_length=128)
        return Dataset.from_dict({**enc, "labels": split.labels})

    return build(task.train), build(task.validation)


class CountingCollator:
    """DataCollatorWithPadding that also counts non-pad tokens and padded positions it hands out."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorWithPadding

        self.inner = DataCollatorWithPadding(tokenizer)
        self.tokens = self.positions = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens += int(batch["attention_mask"].sum())
        self.positions += batch["attention_mask"].numel()
        return batch


def hf_lora_model(r: int, alpha: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("packaged:all-MiniLM-L6-v2"),
                                                               num_labels=2)
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha,
                                            target_modules=["query", "value"]))


def hf_args(out: str, steps: int, lr: float = 2e-4):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=128, learning_rate=lr, warmup_steps=int(0.06 * steps),
                             eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[],
                             seed=0, use_cpu=True, disable_tqdm=True)


def hf_throughput(tokenizer, train, steps: int) -> dict:
    from transformers import Trainer

    collator = CountingCollator(tokenizer)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=hf_lora_model(8, 16), args=hf_args(out, steps), train_dataset=train,
                          data_collator=collator)
        metrics = trainer.train().metrics
    return {"tokens_per_s": collator.tokens / metrics["train_runtime"], "seconds": metrics["train_runtime"],
            "padding_fraction": 1 - collator.tokens / collator.positions}


def hf_search(tokenizer, train, validation) -> dict:
    import numpy as np
    from transformers import Trainer

    built: list[dict] = []

    def model_init(trial):
        # What users write (transformers issue #29391): read r/alpha from the trial. Trainer calls this
        # before it samples hp_space, so trial.params is still empty here and the defaults are built.
        params = trial.params if trial is not None else {}
        r, alpha = params.get("r", 8), params.get("alpha", 16)
        built.append({"r": r, "alpha": alpha})
        return hf_lora_model(r, alpha)

    def hp_space(trial):
        return {"learning_rate": trial.suggest_float("learning_rate", *LR_RANGE, log=True),
                "r": trial.suggest_categorical("r", R_CHOICES),
                "alpha": trial.suggest_categorical("alpha", ALPHA_CHOICES)}

    def metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer = Trainer(model_init=model_init, args=hf_args(out, STEPS), train_dataset=train,
                          eval_dataset=validation, data_collator=CountingCollator(tokenizer), compute_metrics=metrics)
        best = trainer.hyperparameter_search(hp_space=hp_space, backend="optuna", n_trials=TRIALS,
                                             direction="maximize", compute_objective=lambda m: m["eval_accuracy"],
                                             sampler=optuna.samplers.TPESampler(seed=0))
        wall = time.perf_counter() - start
    return {"wall_seconds": wall, "best_val_accuracy": best.objective, "best_hyperparameters": best.hyperparameters,
            "built_per_trial": built[1:]}  # built[0] is the model Trainer builds before the search starts


# ---------------------------------------------------------------- autopeft side

def our_throughput(runtime, steps: int) -> dict:
    params = TrialParams("lora", {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "qv", "use_rslora": False},
                         {"learning_rate": 2e-4, "optimizer": "adamw", "precision": "fp32", "grad_accum_steps": 1,
                          "micro_batch_size": BATCH, "weight_decay": 0.0, "warmup_ratio": 0.06, "scheduler": "linear"})
    config = runtime.config
    runtime.config = SearchConfig.from_dict(config.to_dict(), max_steps=steps)
    try:
        outcome = run_trial(runtime, params, seed=0)
    finally:
        runtime.config = config
    train = outcome.train
    return {"tokens_per_s": train.tokens_per_second, "seconds": train.seconds,
            "padding_fraction": 1 - train.tokens / train.positions,
            "trial_wall_seconds": outcome.seconds}


SPACE = f"""\
method: lora
training:
  learning_rate: {{low: {LR_RANGE[0]}, high: {LR_RANGE[1]}, log: true}}
  optimizer: adamw
  micro_batch_size: {BATCH}
  warmup_ratio: 0.06
methods:
  lora:
    r: {R_CHOICES}
    alpha: {ALPHA_CHOICES}
    target_modules: [qv, attention]
"""


def our_search() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        space = Path(folder) / "space.yaml"
        space.write_text(SPACE)
        config = SearchConfig(space=str(space), study="bench", storage=f"sqlite:///{folder}/o.db",
                              tracking_uri=f"sqlite:///{folder}/m.db", artifacts_dir=f"{folder}/a",
                              trials=TRIALS, max_steps=STEPS)
        start = time.perf_counter()
        study = run_search(config).study
        wall = time.perf_counter() - start
    trials = [t for t in study.trials if t.values]
    best = max(trials, key=lambda t: t.values[0])
    in_loop = sum(t.user_attrs["train_seconds"] for t in trials)
    return {"wall_seconds": wall, "best_val_accuracy": best.values[0], "best_params": best.user_attrs["params"],
            "best_trainable_fraction": best.user_attrs["trainable_fraction"],
            "best_forgetting": best.values[1], "seconds_outside_training_loop": wall - in_loop,
            "median_trial_overhead_fraction": statistics.median(t.user_attrs["overhead_fraction"] for t in trials),
            "trials": [{"params": t.user_attrs["params"], "val_accuracy": t.values[0], "forgetting": t.values[1],
                        "trainable_fraction": t.user_attrs["trainable_fraction"],
                        "wall_seconds": t.user_attrs["wall_seconds"]} for t in trials]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps per throughput run")
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    runtime = prepare_runtime(SearchConfig())
    train, validation = hf_datasets(runtime.tokenizer)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved so both see the same machine state
        ours.append(our_throughput(runtime, args.steps))
        theirs.append(hf_throughput(runtime.tokenizer, train, args.steps))
    results: dict = {
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "throughput": {"steps": args.steps, "batch": BATCH, "config": "LoRA r8 alpha16 q,v lr 2e-4 fp32",
                       "autopeft_runs": ours, "trainer_runs": theirs,
                       "autopeft_median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in ours),
                       "trainer_median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in theirs)},
    }
    t = results["throughput"]
    t["ratio"] = t["autopeft_median_tokens_per_s"] / t["trainer_median_tokens_per_s"]
    if not args.skip_search:
        results["search"] = {"trials": TRIALS, "steps": STEPS, "autopeft": our_search(),
                             "trainer": hf_search(runtime.tokenizer, train, validation)}
        s = results["search"]
        s["wall_ratio"] = s["autopeft"]["wall_seconds"] / s["trainer"]["wall_seconds"]
    (HERE / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (HERE / "results.md").write_text(render(results))
    print(render(results))


def _runs(runs: list[dict]) -> str:
    return ", ".join(f"{run['tokens_per_s']:.0f}" for run in runs)


def render(r: dict) -> str:
    t = r["throughput"]
    lines = ["# autopeft vs transformers.Trainer + peft (MiniLM-L6, Rotten Tomatoes 4000/1000/1000, CPU)", "",
             "Command: `.venv/bin/python experiments/training/bench.py`", "",
             f"Machine: {r['machine']}", "",
             (f"## A. Training throughput, one trial ({t['config']}, batch {t['batch']}, {t['steps']} steps, "
             f"median of {len(t['autopeft_runs'])} interleaved runs)"), "",
             "| | non-pad tokens/s (median) | runs | padding fraction |", "|---|---|---|---|",
             (f"| autopeft loop | {t['autopeft_median_tokens_per_s']:.0f} | "
             f"{_runs(t['autopeft_runs'])} | "
             f"{t['autopeft_runs'][0]['padding_fraction']:.1%} |"),
             (f"| Trainer + DataCollatorWithPadding | {t['trainer_median_tokens_per_s']:.0f} | "
             f"{_runs(t['trainer_runs'])} | "
             f"{t['trainer_runs'][0]['padding_fraction']:.1%} |"),
             f"| **ratio** | **{t['ratio']:.2f}x** | | |", ""]
    if "search" in r:
        s = r["search"]
        a, h = s["autopeft"], s["trainer"]
        lines += [f"## B. A search of {s['trials']} LoRA trials x {s['steps']} steps (same lr, r, alpha choices)", "",
                  "| | wall s | best val accuracy | notes |", "|---|---|---|---|",
                  (f"| autopeft search | {a['wall_seconds']:.0f} | {a['best_val_accuracy']:.4f} | best: "
                  f"{a['best_params']}, {a['best_trainable_fraction']:.2%} of parameters trainable; "
                  f"{a['seconds_outside_training_loop']:.0f} s outside the training loop (model load, eval, probe, logging); "
                  f"per-trial overhead (all but training steps and evaluation) median "
                  f"{a['median_trial_overhead_fraction']:.1%} of trial wall time |"),
                  (f"| Trainer.hyperparameter_search | {h['wall_seconds']:.0f} | {h['best_val_accuracy']:.4f} | "
                  f"sampled {h['best_hyperparameters']}; built per trial: {h['built_per_trial']} |"),
                  f"| **wall ratio (autopeft / Trainer)** | **{s['wall_ratio']:.2f}** | | |", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
