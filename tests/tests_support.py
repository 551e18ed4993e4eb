"""Helpers shared by tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import optuna
import torch

from autopeft.config import SearchConfig
from autopeft.train import classification_loss

SPACE = """\
method: [lora, ia3]
training:
  learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
  optimizer: [adamw, adafactor]
  grad_accum_steps: [1, 2]
  micro_batch_size: [4, 8]
methods:
  lora:
    r: [2, 4, 8]
    alpha: {low: 2, high: 16}
    target_modules: [qv, all_linear]
"""


def tiny_config(tmp_path: Path, tiny_bert: Path, **overrides: object) -> SearchConfig:
    """A search on the tiny BERT and a small real split, with every store inside tmp_path."""
    space = tmp_path / "space.yaml"
    if not space.exists():
        space.write_text(SPACE)
    values = {"model": str(tiny_bert), "space": str(space), "study": "t", "storage": f"sqlite:///{tmp_path}/o.db",
              "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifacts_dir": str(tmp_path / "a"),
              "trials": 3, "max_steps": 3, "train_size": 64, "val_size": 32, "test_size": 32, "seed": 0}
    return SearchConfig(**{**values, **overrides})  # type: ignore[arg-type]


def train_steps(model, batch: dict, lr: float, steps: int, loss_fn=classification_loss,
                after_step=None) -> list[float]:
    """Plain AdamW on one fixed batch; `after_step(model, step)` is a method's hook (AdaLoRA's reallocation)."""
    torch.manual_seed(0)  # dropout masks: the same whatever ran before
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss_sum, count = loss_fn(model, batch)
        (loss_sum / count).backward()
        optimizer.step()
        if after_step:
            after_step(model, step)
        optimizer.zero_grad()
        losses.append(float(loss_sum.detach() / count))
    model.eval()
    return losses


AUTOPEFT = [sys.executable, "-m", "autopeft.cli"]


def autopeft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as a process of its own, as a user's shell runs it."""
    return subprocess.run([*AUTOPEFT, *args], cwd=cwd, capture_output=True, check=False, text=True, timeout=600)


def autopeft_here(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The same command in this test process: the refusal tests run some sixty commands, and a process of its own
    spends 5-8 s of each starting Python and importing torch before it reads its first option. An exception the
    command lets escape is returned as a traceback on stderr, as the process would print it."""
    from typer.testing import CliRunner

    from autopeft.cli import app

    # A search installs its own Ctrl-C handler, and commands set environment defaults (MLflow's retries, say) that
    # later tests' subprocesses would inherit, and quiet warnings and loggers that later tests may look for.
    sigint, folder, environ = signal.getsignal(signal.SIGINT), os.getcwd(), dict(os.environ)
    loggers = {name: logging.getLogger(name).level for name in ("mlflow", "bitsandbytes")}
    optuna_verbosity, formatwarning = optuna.logging.get_verbosity(), warnings.formatwarning
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            done = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(folder)
        signal.signal(signal.SIGINT, sigint)
        os.environ.clear()
        os.environ.update(environ)
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
        optuna.logging.set_verbosity(optuna_verbosity)
        warnings.formatwarning = formatwarning
    stderr = done.stderr
    if done.exception is not None and not isinstance(done.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(done.exception))
    return subprocess.CompletedProcess(list(args), done.exit_code, done.stdout, stderr)
