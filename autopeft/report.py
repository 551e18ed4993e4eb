"""A self-contained report of a finished (or running) study: four plots and one HTML page.

The page answers "which method wins, at what cost" without MLflow or a server: every image is embedded as
a data URI and every style is inline, so the file can be mailed or archived on its own. Trials without
values (failed, pruned over the memory budget) are drawn in a shaded band along the bottom edge of each
plot, so they stay visible instead of silently disappearing.
"""

from __future__ import annotations

import base64
import html
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autopeft.config import format_bytes
from autopeft.errors import ConfigError
from autopeft.study import (
    default_rule,
    forgetting_weight,
    has_scores,
    is_scalar,
    pareto_front,
    scores,
    validation_majority,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from autopeft.noise import Lead

DEFAULT_TOLERANCE = 0.05  # = autopeft.export's, not imported from there: export loads peft
MIB = 2**20
# Trials without values, by state: marker, colour and legend text of their mark in the bottom band.
_NO_VALUE_STYLES = {TrialState.FAIL: ("X", "tab:red", "failed"),
                    TrialState.PRUNED: ("v", "0.35", "pruned / over budget")}


class ReportWarning(UserWarning):
    """A plot could not be drawn and was replaced by a note; the rest of the report was still written."""


# ---------------------------------------------------------------- trial facts


def _method(trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get("params", {}).get("method") or trial.params.get("method") or "?")


def _completed(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if has_scores(t)]


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for v in trial.constraints.values())  # Optuna's own rule: every constraint <= 0


def _memory_bytes(trial: FrozenTrial) -> int | None:
    """Completed trials record the total; pruned ones only the breakdown dict set before the budget check."""
    if "memory_estimate_bytes" in trial.user_attrs:
        return int(trial.user_attrs["memory_estimate_bytes"])
    total = trial.user_attrs.get("memory_estimate", {}).get("total")
    return int(total) if total is not None else None


def _reason(trial: FrozenTrial) -> str:
    for key in ("fail_reason", "prune_reason"):
        if trial.user_attrs.get(key):
            return str(trial.user_attrs[key])
    over = {k: v for k, v in trial.constraints.items() if v > 0}
    return "; ".join(f"infeasible: {k} over by {v:g}" for k, v in over.items())


def _memory_level(trial: FrozenTrial) -> str:
    """Which estimate a trial's figure is: a rejected trial's budget check may have traced it."""
    return str(trial.user_attrs.get("memory_estimate_level") or trial.user_attrs.get("memory_estimate", {}).get("level")
               or "analytic")


def _memory_budget(study: optuna.Study, trials: Sequence[FrozenTrial]) -> int | None:
    """The configured budget, or (for a study without its config) estimate minus the memory constraint."""
    budget = study.user_attrs.get("config", {}).get("memory_budget")
    if budget is not None:
        return int(budget)
    for trial in trials:
        total = _memory_bytes(trial)
        if total is not None and "memory" in trial.constraints:
            return int(total - trial.constraints["memory"])
    return None


def _chosen(study: optuna.Study, rule: str, tolerance: float) -> tuple[FrozenTrial | None, Lead | None, str]:
    """The rule's pick and how far it leads the rule's other candidates; or (None, None, why none is chosen)."""
    from autopeft.errors import StudyError
    from autopeft.export import candidates, lead_of  # lazy: export imports peft, which the plots do not need

    try:
        ranked = candidates(study, rule, tolerance)  # type: ignore[arg-type]
    except StudyError as exc:  # no completed trial, or none the rule admits (a forgetting limit below them all)
        return None, None, str(exc).partition(": ")[2]  # without the option the command line names
    except ValueError:  # none feasible (an empty Pareto front)
        return None, None, "no feasible completed trial"
    return ranked.trials[0], lead_of(study, ranked), ""


def _key_params(trials: Sequence[FrozenTrial]) -> list[str]:
    """The parameters that say how two rows differ: those whose value differs between trials, and a method's
    own (absent from other methods' trials), so a method tried once still shows its rank or targets."""
    seen: dict[str, set[str]] = {}
    holders: Counter[str] = Counter()
    recorded = [t.user_attrs.get("params", {}) for t in trials]
    for params in recorded:
        holders.update(params.keys())
        for key, value in params.items():
            seen.setdefault(key, set()).add(repr(value))
    everywhere = sum(1 for params in recorded if params)
    keys = [k for k, values in seen.items() if k != "method" and (len(values) > 1 or holders[k] < everywhere)]
    return keys or [k for k in seen if k != "method"]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- plotting helpers


def _figure(title: str) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display on servers and CI, and no GUI event loop in tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png", bbox_inches="tight")  # "tight" keeps the legend beside the axes
    plt.close(fig)  # figures are global in pyplot; a long-lived process would otherwise leak them
    return path


def _placeholder(path: Path, title: str, text: str) -> Path:
    fig, ax = _figure(title)
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11, transform=ax.transAxes)
    return _save(fig, path)


def _colors(trials: Sequence[FrozenTrial]) -> dict[str, Any]:
    import matplotlib

    # Sorted, so a method keeps its colour across the plots of one report.
    cmap = matplotlib.colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(sorted({_method(t) for t in trials}))}


def _by_method(ax: Axes, points: Sequence[tuple[FrozenTrial, float, float]], colors: dict[str, Any]) -> None:
    for method, color in colors.items():
        mine = [(x, y) for t, x, y in points if _method(t) == method]
        if mine:
            ax.scatter([x for x, _ in mine], [y for _, y in mine], color=color, s=45, alpha=0.85,
                       label=f"{method} ({len(mine)})", zorder=3)


def _no_value_band(ax: Axes) -> float:
    """Extend the y-axis below the data by a shaded band for trials without values; return its middle."""
    low, high = ax.get_ylim()
    band = 0.14 * (high - low)
    ax.set_ylim(low - band, high)
    ax.axhspan(low - band, low, color="0.93", zorder=0)
    return low - band / 2


def _mark_no_values(ax: Axes, placed: Sequence[tuple[FrozenTrial, float]]) -> None:
    """Failed and pruned trials at their x in the bottom band, labelled by number (their y means nothing)."""
    if not placed:
        return
    y = _no_value_band(ax)
    for state, (marker, color, label) in _NO_VALUE_STYLES.items():
        group = [(t, x) for t, x in placed if t.state == state]
        if not group:
            continue
        ax.scatter([x for _, x in group], [y] * len(group), marker=marker, color=color, s=55, zorder=3,
                   label=f"{label} ({len(group)}, no values: bottom band)")
        for trial, x in group:
            ax.annotate(f"#{trial.number}", (x, y), xytext=(0, 7), textcoords="offset points", ha="center",
                        fontsize=7, color=color)


def _spread(ax: Axes, trials: Sequence[FrozenTrial]) -> list[tuple[FrozenTrial, float]]:
    """Evenly spaced x positions for trials whose x is unknown (no forgetting value)."""
    low, high = ax.get_xlim()
    ax.set_xlim(low, high)  # frozen: these made-up positions must not rescale the forgetting axis
    step = (high - low) / (len(trials) + 1)
    return [(t, low + step * (i + 1)) for i, t in enumerate(trials)]


def _majority_line(ax: Axes, study: optuna.Study) -> None:
    majority = validation_majority(study)
    if majority is not None:  # a trial at this accuracy learned nothing; it is the floor to beat
        ax.axhline(majority, color="0.5", linestyle=":", label=f"majority class ({majority:.3f})")


def _mark_chosen(ax: Axes, chosen: FrozenTrial | None, xy: tuple[float, float] | None, rule: str) -> None:
    if chosen is None or xy is None:
        return
    ax.scatter([xy[0]], [xy[1]], marker="*", s=260, color="gold", edgecolors="black", zorder=5,
               label=f"chosen: #{chosen.number} ({rule})")
    ax.annotate(f"#{chosen.number}: acc {scores(chosen)[0]:.3f}, forgetting {scores(chosen)[1]:.3f}", xy,
                xytext=(12, -18), textcoords="offset points", fontsize=8,
                arrowprops={"arrowstyle": "-", "color": "0.3"})


def _no_completed_note(ax: Axes, completed: Sequence[FrozenTrial]) -> None:
    if not completed:
        ax.text(0.5, 0.55, "no completed trial yet", ha="center", va="center", fontsize=13, color="0.4",
                transform=ax.transAxes)


def _legend(ax: Axes) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: never over a point


# ---------------------------------------------------------------- the four plots


def _pareto_front(ax: Axes, study: optuna.Study) -> None:
    front = sorted(pareto_front([t for t in _completed(study.trials) if _feasible(t)]), key=lambda t: scores(t)[1])
    if not front:
        return
    xs, ys = [scores(t)[1] for t in front], [scores(t)[0] for t in front]
    ax.plot(xs, ys, color="black", linestyle="--", linewidth=1, zorder=2)
    ax.scatter(xs, ys, s=150, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4,
               label=f"Pareto front ({len(front)})")


def _mark_infeasible(ax: Axes, completed: Sequence[FrozenTrial]) -> None:
    infeasible = [t for t in completed if not _feasible(t)]
    if infeasible:  # they have values but can never be chosen: cross them out where they are
        ax.scatter([scores(t)[1] for t in infeasible], [scores(t)[0] for t in infeasible], marker="x", s=90,
                   color="tab:red", zorder=5, label=f"infeasible ({len(infeasible)}, over a constraint)")


def plot_pareto(study: optuna.Study, path: Path, chosen: FrozenTrial | None, rule: str) -> Path:
    trials = study.get_trials(deepcopy=False)
    completed = _completed(trials)
    fig, ax = _figure("Validation accuracy vs forgetting (up and to the left is better)")
    ax.set_xlabel("forgetting (the study's forgetting probe; lower is better)")
    ax.set_ylabel("validation accuracy")
    _by_method(ax, [(t, scores(t)[1], scores(t)[0]) for t in completed], _colors(trials))
    _pareto_front(ax, study)
    _mark_infeasible(ax, completed)
    _majority_line(ax, study)
    _mark_chosen(ax, chosen, (scores(chosen)[1], scores(chosen)[0]) if chosen else None, rule)
    _no_completed_note(ax, completed)
    _mark_no_values(ax, _spread(ax, [t for t in trials if t.state in _NO_VALUE_STYLES]))
    _legend(ax)
    return _save(fig, path)


def _best_so_far(ax: Axes, completed: Sequence[FrozenTrial], value: Callable[[FrozenTrial], float]) -> None:
    feasible = sorted((t for t in completed if _feasible(t)), key=lambda t: t.number)
    if not feasible:
        return
    best, xs, ys = float("-inf"), [], []
    for trial in feasible:
        best = max(best, value(trial))
        xs.append(trial.number)
        ys.append(best)
    ax.plot(xs, ys, drawstyle="steps-post", color="black", linewidth=1.5, label="best so far", zorder=2)


def plot_history(study: optuna.Study, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    trials = study.get_trials(deepcopy=False)
    completed = _completed(trials)
    scalar = is_scalar(study)  # then the history of what the study maximised, which picks its trial
    name = f"objective (accuracy - {forgetting_weight(study):g} x forgetting)" if scalar else "validation accuracy"
    value: Callable[[FrozenTrial], float] = (lambda t: t.values[0]) if scalar else (lambda t: scores(t)[0])
    fig, ax = _figure(f"Optimization history: {name} per trial")
    ax.set_xlabel("trial number")
    ax.set_ylabel(name)
    _by_method(ax, [(t, t.number, value(t)) for t in completed], _colors(trials))
    _best_so_far(ax, completed, value)
    if not scalar:
        _majority_line(ax, study)
    _no_completed_note(ax, completed)
    _mark_no_values(ax, [(t, float(t.number)) for t in trials if t.state in _NO_VALUE_STYLES])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax)
    return _save(fig, path)


def _importances(study: optuna.Study) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental and single-value notes: not for the reader
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                       target=lambda t: scores(t)[0])


def plot_importance(study: optuna.Study, path: Path) -> Path:
    title = "Parameter importance for validation accuracy (fANOVA)"
    completed = _completed(study.get_trials(deepcopy=False))
    if len(completed) < 2:
        return _placeholder(path, title, "Parameter importance needs at least 2 completed trials; "
                                         f"this study has {len(completed)}.")
    try:
        importances = _importances(study)
    except Exception as exc:  # noqa: BLE001 -- fANOVA rejects some studies (conditional or constant params): say so
        return _placeholder(path, title, f"Parameter importance is not available:\n"
                                         f"{type(exc).__name__}: {exc}")
    if not importances:
        return _placeholder(path, title, "No parameter was sampled in every completed trial.")
    fig, ax = _figure(title)
    names = list(importances)[::-1]  # most important on top
    bars = ax.barh(names, [float(importances[n]) for n in names], height=0.6, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    ax.set_xlabel("share of the accuracy variance explained (sums to 1)\n"
                  "only parameters sampled in every completed trial: method-specific ones are left out")
    return _save(fig, path)


def _memory_notes(ax: Axes, study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
    budget = _memory_budget(study, trials)
    if budget is not None:
        ax.axvline(budget / MIB, color="tab:red", linestyle="--",
                   label=f"memory budget ({format_bytes(budget)})")
    drawable = (TrialState.COMPLETE, *_NO_VALUE_STYLES)
    missing = [t for t in trials if t.state in drawable and _memory_bytes(t) is None]
    if missing:  # e.g. trials that failed before their adapter was built: no estimate to place them at
        ax.set_xlabel(f"{ax.get_xlabel()}\n{len(missing)} trial(s) without a memory estimate are not shown")


def _mib(trial: FrozenTrial) -> float | None:
    memory = _memory_bytes(trial)
    return memory / MIB if memory is not None else None


def plot_accuracy_vs_memory(study: optuna.Study, path: Path, chosen: FrozenTrial | None, rule: str) -> Path:
    trials = study.get_trials(deepcopy=False)
    placed = [(t, mib) for t in trials if (mib := _mib(t)) is not None]
    completed = [(t, mib, scores(t)[0]) for t, mib in placed if has_scores(t)]
    fig, ax = _figure("Validation accuracy vs estimated peak training memory")
    ax.set_xlabel("estimated peak training memory (MiB)")
    ax.set_ylabel("validation accuracy")
    _by_method(ax, completed, _colors(trials))
    _memory_notes(ax, study, trials)
    _majority_line(ax, study)
    chosen_mib = _mib(chosen) if chosen else None
    xy = (chosen_mib, scores(chosen)[0]) if chosen and chosen_mib is not None else None
    _mark_chosen(ax, chosen, xy, rule)
    _no_completed_note(ax, [t for t, _, _ in completed])
    _mark_no_values(ax, [(t, mib) for t, mib in placed if t.state in _NO_VALUE_STYLES])
    _legend(ax)
    return _save(fig, path)


def _safely(draw: Callable[[Path], Path], path: Path) -> Path:
    """One plot's bug must not cost the whole report (it runs after hours of search): draw a note instead."""
    try:
        return draw(path)
    except Exception as exc:  # noqa: BLE001 -- any plot's failure, as the docstring says
        import matplotlib.pyplot as plt

        plt.close("all")
        warnings.warn(ReportWarning(f"{path.name}: {type(exc).__name__}: {exc}"), stacklevel=2)
        return _placeholder(path, path.stem, f"This plot could not be drawn:\n{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- HTML


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}code{background:#f3f3f3;padding:0 .3em}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f0f0f0;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.front td:first-child{font-weight:bold}tr.chosen{background:#fff3b8}td.reason{max-width:32em}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#555}.note{color:#555;font-size:13px}"""

_CAPTIONS = {
    "pareto.png": "Accuracy vs forgetting: Pareto front outlined and joined, chosen trial starred.",
    "history.png": "Validation accuracy per trial and the best so far.",
    "importance.png": "Which parameters explain validation accuracy (fANOVA).",
    "accuracy_vs_memory.png": "Accuracy vs estimated peak training memory (MiB).",
}


def _img(path: Path, scalar: bool) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    text = _CAPTIONS.get(path.name, path.name)
    if scalar and path.name == "history.png":  # a scalar study plots what it ranks trials by
        text = "The objective (accuracy - weight x forgetting) per trial and the best so far."
    caption = html.escape(text)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _chosen_html(chosen: FrozenTrial | None, lead: Lead | None, rule: str, tolerance: float, weight: float,
                 any_completed: bool, why_none: str) -> str:
    if chosen is None and not any_completed:
        return '<p id="chosen">No completed trial in this study: nothing to choose yet.</p>'
    if chosen is None:
        return f'<p id="chosen">The rule <code>{html.escape(rule)}</code> chose no trial: {html.escape(why_none)}.</p>'
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in chosen.user_attrs.get("params", {}).items())
    rule_text = {"balanced": f"{rule} (tolerance {tolerance:g})",
                 "best-scalar": f"{rule} (forgetting weight {weight:g})"}.get(rule, rule)
    return (f'<p id="chosen">Chosen trial: <b>#{chosen.number}</b> ({html.escape(_method(chosen))}) by rule '
            f"<code>{html.escape(rule_text)}</code>: validation accuracy {scores(chosen)[0]:.4f}, "
            f"forgetting {scores(chosen)[1]:.4f}.</p><p class=\"note\">{html.escape(params)}</p>"
            + (f'<p id="lead">How far it leads: {html.escape(lead.describe())}.</p>' if lead else ""))


def _warning_html(study: optuna.Study, chosen: FrozenTrial | None) -> list[str]:
    from autopeft.export import majority_warning

    warning = majority_warning(study, chosen) if chosen is not None else None
    return [f'<p id="warning"><b>Warning</b>: {html.escape(warning)}.</p>'] if warning else []


_LABELS_SHOWN = 12


def _objective_text(config: dict[str, Any]) -> str:
    if config.get("objective_mode") == "scalar":
        return f"accuracy - {float(config.get('forgetting_weight', 1.0)):g} x forgetting (scalar)"
    return ", ".join(config.get("objectives", ("accuracy", "forgetting"))) + " (Pareto)"


def _config_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    if not config:  # a study not written by `autopeft search`
        return []
    pruner = str(config.get("pruner", "none")) + (f", after {config['prune_after']} steps"
                                                   if config.get("prune_after") else "")
    budget = config.get("memory_budget")
    rows = [("model", str(config.get("model"))),
            ("task", f"{config.get('task')} ({config.get('task_type', 'classification')})"),
            ("objective", _objective_text(config)),
            ("sampler", f"{config.get('sampler')}, seed {config.get('seed')}"), ("pruner", pruner),
            ("steps per trial", str(config.get("max_steps"))),
            ("memory budget", format_bytes(budget) if budget else "none")]
    return rows


def _probe_rows(study: optuna.Study) -> list[tuple[str, str]]:
    """Which probes scored the trials, the forgetting one (the objective's) first: "forgetting" says nothing
    without the probe behind it."""
    from autopeft.probes import PROBES

    names = study.user_attrs.get("probe_names") or study.user_attrs.get("config", {}).get("probes")
    if not names:
        return []
    primary = next((n for n in names if n in PROBES and PROBES[n][3]), None)  # as ProbeSet picks it
    return [("probes", ", ".join(f"{n} (the forgetting objective)" if n == primary else n
                                 for n in sorted(names, key=lambda n: n != primary)))]


def _label_word_rows(config: dict[str, Any], split: dict[str, Any]) -> list[tuple[str, str]]:
    """The word a causal LM answers for each label, paired (the words follow the labels' sorted order)."""
    words, labels = config.get("label_words"), split.get("labels") or []
    if not words:
        return []
    if len(words) != len(labels):
        return [("label words", ", ".join(words))]
    return [("label words", ", ".join(f"{label} -> {word}" for label, word in zip(labels, words)))]


def _split_rows(split: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    labels = [str(label) for label in split.get("labels", [])]
    if labels:  # open answers can hold a label per row: name a few and count them
        more = f", ... ({len(labels)} in all)" if len(labels) > _LABELS_SHOWN else ""
        rows.append(("labels", ", ".join(labels[:_LABELS_SHOWN]) + more))
    sizes = [f"{split[f'{name}_size']} {name}" for name in ("train", "validation", "test", "ood")
             if f"{name}_size" in split]
    if sizes:
        rows.append(("rows", " / ".join(sizes)))
    if split.get("validation_majority") is not None:
        majority = split["validation_majority"]
        rows.append(("majority class", f"{majority:.4f} of validation (what a trial that learns nothing scores)"))
    return rows


def _setup_html(study: optuna.Study) -> list[str]:
    """What the study ran on, from its recorded config and split: a mailed report must say what it is about."""
    config, split = study.user_attrs.get("config", {}), study.user_attrs.get("split", {})
    facts = _config_rows(config) + _probe_rows(study) + _label_word_rows(config, split) + _split_rows(split)
    rows = "".join(f"<tr><th>{html.escape(what)}</th><td>{html.escape(value)}</td></tr>" for what, value in facts)
    return [f'<table id="setup"><tbody>{rows}</tbody></table>'] if rows else []


def _counts_html(trials: Sequence[FrozenTrial]) -> str:
    counts = Counter(t.state.name.lower() for t in trials)
    text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials"
    return f"<p>{len(trials)} trials: {html.escape(text)}.</p>"


_COLUMNS = ("#", "state", "method", "key params", "val acc", "forgetting", "trainable params",
            "memory estimate", "wall s", "reason")
_CLASSES = ("num", "", "", "", "num", "num", "num", "num", "num", "reason")  # right-align numbers


def _columns(scalar: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The table's headings and cell classes; a scalar study shows the value it ranks trials by after forgetting."""
    if not scalar:
        return _COLUMNS, _CLASSES
    return _COLUMNS[:6] + ("objective",) + _COLUMNS[6:], _CLASSES[:6] + ("num",) + _CLASSES[6:]


def _cells(trial: FrozenTrial, keys: Sequence[str], scalar: bool = False) -> list[str]:
    """One trials-table row, in the order of _columns(scalar); blank where the trial has no such fact."""
    params = trial.user_attrs.get("params", {})
    values = scores(trial) if has_scores(trial) else None
    trainable, fraction = trial.user_attrs.get("trainable_params"), trial.user_attrs.get("trainable_fraction")
    memory, wall = _memory_bytes(trial), trial.user_attrs.get("wall_seconds")
    share = f" ({fraction:.2%})" if fraction is not None else ""
    objective = [f"{trial.value:.4f}" if values and trial.value is not None else ""] if scalar else []
    return [
        str(trial.number), trial.state.name.lower(), _method(trial),
        ", ".join(f"{k}={_fmt(params[k])}" for k in keys if k in params),
        f"{values[0]:.4f}" if values else "", f"{values[1]:.4f}" if values else "", *objective,
        f"{trainable:,}{share}" if trainable is not None else "",
        f"{format_bytes(memory)} ({_memory_level(trial)})" if memory is not None else "",
        f"{wall:.1f}" if wall is not None else "", _reason(trial),
    ]


def _class(name: str) -> str:
    return f' class="{name}"' if name else ""


def _table_html(study: optuna.Study, trials: Sequence[FrozenTrial], chosen: FrozenTrial | None) -> str:
    keys, scalar = _key_params(trials), is_scalar(study)
    columns, classes = _columns(scalar)
    front = {t.number for t in pareto_front([t for t in _completed(study.trials) if _feasible(t)])}
    rows = []
    for trial in trials:
        marks = [c for c, on in (("front", trial.number in front),
                                 ("chosen", chosen is not None and trial.number == chosen.number)) if on]
        cells = "".join(f"<td{_class(cls)}>{html.escape(text)}</td>"
                        for cls, text in zip(classes, _cells(trial, keys, scalar), strict=True))
        rows.append(f'<tr id="trial-{trial.number}"{_class(" ".join(marks))}>{cells}</tr>')
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _confirmations_html(study: optuna.Study) -> list[str]:
    """The runs `autopeft export --confirm-seeds` kept: how far each leading trial's own run is from its mean."""
    from autopeft.confirm import kept_confirmations  # lazy, as export: it imports torch

    confirmations = kept_confirmations(study)
    if not confirmations:
        return []
    head = "".join(f"<th>{c}</th>" for c in ("#", "its run", "mean val acc", "sd", "mean forgetting", "runs", "failed"))
    rows = "".join(
        f'<tr id="confirmed-{c.trial_number}"><td class="num">{c.trial_number}</td><td class="num">{c.runs[0][1]:.4f}'
        f'</td><td class="num">{c.accuracy:.4f}</td><td class="num">{c.accuracy_sd:.4f}</td><td class="num">'
        f'{c.forgetting:.4f}</td><td class="num">{len(c.runs)}</td><td class="reason">'
        f"{html.escape('; '.join(c.failures))}</td></tr>" for c in confirmations)
    return ["<h2>Confirmation runs</h2>",
            ('<p class="note">Leading trials retrained with new seeds by <code>autopeft export --confirm-seeds</code>: '
            "its run is the search's own, the mean and sd are over all runs.</p>"),
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"]


def _page(study: optuna.Study, chosen: FrozenTrial | None, lead: Lead | None, why_none: str, rule: str,
          tolerance: float, plots: Sequence[Path]) -> str:
    trials = study.get_trials(deepcopy=False)
    name = html.escape(study.study_name)
    return "\n".join([
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>autopeft report: {name}</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>autopeft study <code>{name}</code></h1>", *_setup_html(study), _counts_html(trials),
        "<h2>Chosen trial</h2>", _chosen_html(chosen, lead, rule, tolerance, forgetting_weight(study),
                                               bool(_completed(trials)), why_none),
        *_warning_html(study, chosen),
        "<h2>Plots</h2>", *(_img(p, is_scalar(study)) for p in plots),
        "<h2>All trials</h2>",
        '<p class="note">Bold number: on the Pareto front. Highlighted row: the chosen trial.</p>',
        _table_html(study, trials, chosen), *_confirmations_html(study), "</body></html>",
    ])


REPORT_FILES = ("pareto.png", "history.png", "importance.png", "accuracy_vs_memory.png", "report.html")


def check_report_out(out: Path) -> None:
    """Refuse, before anything is drawn, an --out where one of the report's files is a folder (a traceback came
    after the plots were written)."""
    folders = [name for name in REPORT_FILES if (Path(out) / name).is_dir()]
    if folders:
        raise ConfigError([(f"--out: {Path(out) / folders[0]} is a folder where the report writes a file; move it or "
                           "choose another --out")])


def write_report(study: optuna.Study, out: Path, *, rule: str | None = None,
                 tolerance: float = DEFAULT_TOLERANCE) -> list[Path]:
    """Write the four plots and report.html into `out`; return their paths (plots first, page last). The
    chosen trial is `rule`'s pick, by default the study's own (`autopeft export`'s default)."""
    rule = rule or default_rule(study)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen, lead, why_none = _chosen(study, rule, tolerance)
    draws: dict[str, Callable[[Path], Path]] = {  # REPORT_FILES, less the page
        "pareto.png": lambda p: plot_pareto(study, p, chosen, rule),
        "history.png": lambda p: plot_history(study, p),
        "importance.png": lambda p: plot_importance(study, p),
        "accuracy_vs_memory.png": lambda p: plot_accuracy_vs_memory(study, p, chosen, rule),
    }
    plots = [_safely(draw, out / name) for name, draw in draws.items()]
    page = out / "report.html"
    page.write_text(_page(study, chosen, lead, why_none, rule, tolerance, plots), encoding="utf-8")
    return [*plots, page]
