"""Does a lead within the validation set's sampling error tell when a search's pick was luck?

`autopeft search`, `export` and `report` now say how far the pick leads the rule's other candidates: which of
them lie within two standard errors (sqrt(p(1-p)/n)) of its validation accuracy. This replay asks what that
flag is worth, on runs already made (no training): bench parts `longer` and `bounded` (results.json; MiniLM,
60 steps, 500 validation rows, seeds 0-2) and seed_spread.json, which retrained the configurations that decided
those searches with five new training seeds each. For every search, its trials are ranked by validation
accuracy (the rule max-accuracy-under-forgetting=1); the pick is the first. Each other trial whose
configuration was retrained, as was the pick's, makes a pair: the run gap (pick minus other, as the search
saw it), whether it is within two standard errors, and the mean gap over the five new runs (independent of
the run that made the pick). A pair "was luck" when the other configuration's mean is at least the pick's.

Run:  .venv/bin/python experiments/search/lead_check.py   (seconds; writes lead_check.json and lead_check.md)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from autopeft.noise import CLOSE, close_margin

PARTS = {"longer": ("tpe-accuracy", "random"), "bounded": ("tpe", "nsga2", "random")}
ROWS = 500  # the bench's validation rows
COMMAND = "python experiments/search/lead_check.py"


def key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)  # as seed_spread.json keys its configurations


def ranked(trials: list[dict]) -> list[dict]:
    done = [t for t in trials if t.get("val_accuracy") is not None]
    return sorted(done, key=lambda t: -t["val_accuracy"])  # stable: the earlier of equal trials first


def pairs_of(part: str, seed: int, strategy: str, trials: list[dict], means: dict[str, float]) -> list[dict]:
    pick, *others = ranked(trials)
    if key(pick["params"]) not in means:
        return []
    margin = close_margin(pick["val_accuracy"], ROWS)
    return [{"part": part, "seed": seed, "strategy": strategy, "pick": pick["number"], "other": other["number"],
             "pick_config": key(pick["params"]), "other_config": key(other["params"]),
             "run_gap": pick["val_accuracy"] - other["val_accuracy"],
             "close": pick["val_accuracy"] - other["val_accuracy"] <= margin,
             "mean_gap": means[key(pick["params"])] - means[key(other["params"])],
             "pick_run_above_mean": pick["val_accuracy"] - means[key(pick["params"])]}
            for other in others if key(other["params"]) in means and key(other["params"]) != key(pick["params"])]


def collect() -> list[dict]:
    results = json.loads((HERE / "results.json").read_text())["parts"]
    spread = json.loads((HERE / "seed_spread.json").read_text())["parts"]
    seen, pairs = set(), []
    for part, strategies in PARTS.items():
        for run in results[part]:
            means = {config: statistics.fmean(accuracies)
                     for config, accuracies in spread[part]["runs"][str(run["seed"])].items()}
            for strategy in strategies:
                for pair in pairs_of(part, run["seed"], strategy, run["strategies"][strategy]["trials"], means):
                    # Strategies share start-up draws: the same two configurations count once per seed.
                    same = (part, run["seed"], pair["pick_config"], pair["other_config"])
                    if same not in seen:
                        seen.add(same)
                        pairs.append(pair)
    return pairs


def summary(pairs: list[dict]) -> dict:
    def group(close: bool) -> dict:
        chosen = [p for p in pairs if p["close"] is close]
        luck = [p for p in chosen if p["mean_gap"] <= 0]
        return {"pairs": len(chosen), "other_mean_at_least_pick": len(luck),
                "median_mean_gap": statistics.median(p["mean_gap"] for p in chosen) if chosen else None}
    return {"within_two_standard_errors": group(True), "beyond": group(False)}


def render(pairs: list[dict], totals: dict) -> str:
    lines = ["# Does a lead within sampling error tell when the pick was luck? (replay, no training)", "",
             f"`{COMMAND}`: bench parts `longer` and `bounded` (MiniLM, 60 steps, {ROWS} validation rows, seeds",
             "0-2), and seed_spread.json's five new training runs of the configurations that decided them. In each",
             "search the pick is the most accurate trial; each other trial whose configuration was retrained (as",
             "the pick's was) makes a pair. Mean gap: pick minus other, over the five new runs each.", "",
             "| group | pairs | other's mean >= pick's | median mean gap |", "|---|---|---|---|"]
    for name, group in (("within two standard errors", totals["within_two_standard_errors"]),
                        ("beyond two standard errors", totals["beyond"])):
        gap = "-" if group["median_mean_gap"] is None else f"{group['median_mean_gap']:+.3f}"
        lines.append(f"| {name} | {group['pairs']} | {group['other_mean_at_least_pick']} | {gap} |")
    lines += ["", _reading(pairs, totals)]
    lines += ["", "| part | seed | strategy | pick | other | run gap | within 2 SE | mean gap | pick's run above its mean |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['part']} | {p['seed']} | {p['strategy']} | {p['pick']} | {p['other']} | "
                     f"{p['run_gap']:.3f} | {'yes' if p['close'] else 'no'} | {p['mean_gap']:+.3f} | "
                     f"{p['pick_run_above_mean']:+.3f} |")
    return "\n".join(lines) + "\n"


def _reading(pairs: list[dict], totals: dict) -> str:
    close, beyond = totals["within_two_standard_errors"], totals["beyond"]
    lucky = [p["pick_run_above_mean"] for p in pairs if not p["close"] and p["mean_gap"] <= 0]
    above = f" Where a lead beyond them was luck, the pick's run stood {min(lucky):+.3f} to {max(lucky):+.3f} " \
            "above its configuration's mean: the training seed's spread, which one run cannot show." if lucky else ""
    return (f"Reading: the other configuration averaged at least the pick's in {close['other_mean_at_least_pick']} "
            f"of {close['pairs']} pairs within two standard errors and in {beyond['other_mean_at_least_pick']} of "
            f"{beyond['pairs']} beyond them.{above} Pairs share picks (one pick, several others), so these are "
            "few independent cases. Sampling error names the trials the validation rows cannot separate; it does "
            "not tell a pick that will hold up when retrained: that takes `export --confirm-seeds`.")


def main() -> None:
    pairs = collect()
    totals = summary(pairs)
    (HERE / "lead_check.json").write_text(json.dumps({"command": COMMAND, "rows": ROWS, "close_within": CLOSE,
                                                      "summary": totals, "pairs": pairs}, indent=1))
    (HERE / "lead_check.md").write_text(render(pairs, totals))
    print(json.dumps(totals, indent=1))


if __name__ == "__main__":
    main()
