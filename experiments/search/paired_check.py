"""Are the causal exports that beat the recipe at its costs ahead on the same rows, or only by chance?

A bounded causal part (`causal-bounded-all-methods`, `causal-bounded-warm`) compares each export with the
default recipe by two accuracies on the same 600 test (and 300 validation) rows, by margins of a few rows (in
the first part all under one standard error of an accuracy). A paired test uses the rows both models were
scored on: only the rows where they disagree carry information, and under "no difference" each such row goes
either way with probability 1/2 (exact McNemar test, two-sided).

Per (seed, strategy) whose recipe-bound export beat the recipe: the recipe is retrained (seeded: its accuracies
repeat the part's), the export is read from the adapter the part saved, and both predict every row.

Run right after the part, on the machine that ran it (the adapters live in the folders results.json records):
    .venv/bin/python experiments/search/paired_check.py [--part causal-bounded-warm]
Writes paired_check.json and paired_check.md next to this file (for another part than the first,
paired_check_PART.json and .md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import base_config, recipe_params

from autopeft.config import SearchConfig
from autopeft.search import load_trained, prepare_runtime, run_trial

HERE = Path(__file__).resolve().parent
DEFAULT_PART = "causal-bounded-all-methods"


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value that rows one model alone gets right split this unevenly by chance."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(recipe: list[bool], export: list[bool]) -> dict:
    only_export = sum(e and not r for r, e in zip(recipe, export, strict=True))
    only_recipe = sum(r and not e for r, e in zip(recipe, export, strict=True))
    return {"rows": len(recipe), "recipe_accuracy": sum(recipe) / len(recipe),
            "export_accuracy": sum(export) / len(export), "only_export_right": only_export,
            "only_recipe_right": only_recipe, "p_value": mcnemar_p(only_export, only_recipe)}


def check_seed(part: str, row: dict) -> list[dict]:
    wins = {name: s["export"]["recipe-bound"] for name, s in row["strategies"].items()
            if s["export"].get("recipe-bound")
            and s["export"]["recipe-bound"]["test_accuracy"] > row["default_recipe"]["test_accuracy"]}
    if not wins:
        return []
    folder = Path(tempfile.mkdtemp(prefix="paired-check-"))
    runtime = prepare_runtime(SearchConfig(**base_config(part, row["seed"], folder, None)))
    recipe_model = run_trial(runtime, recipe_params(runtime), seed=row["seed"]).model
    recipe_model.eval()
    recipe = {split: runtime.evaluate.hits(recipe_model, getattr(runtime, split)).tolist()
              for split in ("validation", "test")}
    results = []
    for name, export in wins.items():
        study = Path(row["strategies"][name]["folder"]) / "artifacts" / f"{part}-{name}-{row['seed']}"
        model = load_trained(runtime, study / f"trial-{export['trial']}")
        result = {"seed": row["seed"], "strategy": name, "trial": export["trial"],
                  "method": export["params"]["method"]}
        for split in ("validation", "test"):
            result[split] = compare(recipe[split], runtime.evaluate.hits(model, getattr(runtime, split)).tolist())
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def render(part: str, results: list[dict]) -> str:
    lines = ["# Paired check: the causal exports that beat the recipe at its costs", "",
             (f"Part `{part}`; command: `python experiments/search/paired_check.py"
             f"{'' if part == DEFAULT_PART else ' --part ' + part}` (right after the part)."), "",
             ("Rows only the export gets right against rows only the recipe gets right, and the exact two-sided "
             "McNemar p-value (chance that a split this uneven happens with no difference)."), "",
             ("| seed | strategy | export (trial, method) | split | recipe / export accuracy | only export / only recipe "
             "right | p |"), "|---|---|---|---|---|---|---|"]
    for r in results:
        for split in ("validation", "test"):
            c = r[split]
            lines.append(f"| {r['seed']} | {r['strategy']} | {r['trial']}, {r['method']} | {split} ({c['rows']} rows) "
                         f"| {c['recipe_accuracy']:.4f} / {c['export_accuracy']:.4f} | {c['only_export_right']} / "
                         f"{c['only_recipe_right']} | {c['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default=DEFAULT_PART)
    part = parser.parse_args().part
    rows = json.loads((HERE / "results.json").read_text())["parts"][part]
    results = [r for row in rows for r in check_seed(part, row)]
    name = "paired_check" if part == DEFAULT_PART else f"paired_check_{part}"
    (HERE / f"{name}.json").write_text(json.dumps(results, indent=2))
    (HERE / f"{name}.md").write_text(render(part, results))
    print(render(part, results))


if __name__ == "__main__":
    main()
