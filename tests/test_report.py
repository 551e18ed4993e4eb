"""The study report: five files from a synthetic multi-objective study, self-contained, never crashing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import optuna
import pytest

from autopeft.export import select_trial
from autopeft.report import ReportWarning, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILES = ("pareto.png", "history.png", "importance.png", "accuracy_vs_memory.png", "report.html")
FAIL_REASON = "out of memory: CUDA <tried> to allocate & failed"  # markup characters: must be escaped
PRUNE_REASON = "estimated peak 3.1 GiB exceeds the budget of 2147483648 bytes"

# (method, accuracy, forgetting, learning rate, memory MiB) of the completed trials.
COMPLETED = [("lora", 0.62, 0.04, 1e-3, 900), ("ia3", 0.55, 0.01, 2e-2, 600),
             ("lora", 0.78, 0.12, 3e-3, 1100), ("ia3", 0.70, 0.03, 4e-2, 650),
             ("lora", 0.81, 0.25, 4e-3, 1500), ("ia3", 0.66, 0.05, 1e-2, 620),
             ("lora", 0.74, 0.20, 8e-4, 1000)]


def ask(study: optuna.Study, method: str, lr: float) -> optuna.Trial:
    """A trial with conditional parameters as the real space has them (lora.r only for LoRA), recorded as
    search.py records them; enqueued so that the method and learning rate are the ones given."""
    study.enqueue_trial({"method": method, "learning_rate": lr, "lora.r": 4 if lr < 2e-3 else 16})
    trial = study.ask()
    params: dict[str, object] = {"method": trial.suggest_categorical("method", ["lora", "ia3"]),
                                 "learning_rate": trial.suggest_float("learning_rate", 5e-4, 5e-2, log=True),
                                 "precision": "fp32"}
    if method == "lora":
        params["lora.r"] = trial.suggest_categorical("lora.r", [4, 8, 16])
    trial.set_user_attr("params", params)
    return trial


def complete(study: optuna.Study, method: str, acc: float, forgetting: float, lr: float, mib: int) -> None:
    trial = ask(study, method, lr)
    trainable = 300_000 if method == "lora" else 20_000
    for key, value in {"trainable_params": trainable, "trainable_fraction": trainable / 22_700_000,
                       "wall_seconds": 12.5, "memory_estimate_bytes": mib * 2**20}.items():
        trial.set_user_attr(key, value)
    trial.set_constraint("memory", mib * 2**20 - 2**31)  # a 2 GiB budget, as search.py records it
    study.tell(trial, (acc, forgetting))


def synthetic_study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="report-test <&>", directions=["maximize", "minimize"])
    study.set_user_attr("split", {"validation_majority": 0.5, "validation_size": 200})
    for row in COMPLETED[:4]:
        complete(study, *row)
    failed = ask(study, "lora", 1e-3)
    failed.set_user_attr("fail_reason", FAIL_REASON)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    pruned = ask(study, "lora", 2e-3)
    pruned.set_user_attr("memory_estimate", {"total": 2**31 + 10**6})
    pruned.set_user_attr("prune_reason", PRUNE_REASON)
    pruned.set_constraint("memory", 1e6)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    for row in COMPLETED[4:]:
        complete(study, *row)
    return study


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, list[Path], str]:
    study = synthetic_study()
    out = tmp_path_factory.mktemp("report")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_report(study, out)
    assert not [w for w in caught if issubclass(w.category, ReportWarning)]  # no plot replaced by a note
    return study, paths, (out / "report.html").read_text(encoding="utf-8")


def test_all_five_files_are_written_and_returned(report: tuple[optuna.Study, list[Path], str]) -> None:
    _, paths, _ = report
    assert [p.name for p in paths] == list(FILES)
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_the_page_lists_every_trial_method_reason_and_the_chosen_trial(
        report: tuple[optuna.Study, list[Path], str]) -> None:
    study, _, page = report
    for trial in study.trials:
        assert f'<tr id="trial-{trial.number}"' in page
    assert "lora" in page and "ia3" in page
    chosen = select_trial(study)
    assert f"Chosen trial: <b>#{chosen.number}</b>" in page
    assert re.search(rf'<tr id="trial-{chosen.number}" class="[^"]*chosen', page)
    assert re.search(r'<p id="lead">How far it leads: val accuracy [0-9.]+ on 200 rows, standard error', page)
    assert "CUDA &lt;tried&gt; to allocate &amp; failed" in page and FAIL_REASON not in page
    assert PRUNE_REASON in page
    assert f"{COMPLETED[0][4]:.1f} MiB (analytic)" in page  # which estimate: an export's card shows a traced one
    assert "report-test &lt;&amp;&gt;" in page
    assert 'id="warning"' not in page  # the pick beat the majority class (0.5)
    assert "<figcaption>Validation accuracy per trial and the best so far.</figcaption>" in page  # Pareto: accuracy


def test_a_chosen_trial_no_better_than_the_majority_class_is_flagged(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("split", {"validation_majority": 0.6})
    complete(study, "ia3", 0.6, 0.0, 1e-2, 600)
    write_report(study, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<p id="warning"><b>Warning</b>: trial 0 is no better than the majority class' in page


def scalar_study(weight: float = 2.0) -> optuna.Study:
    """COMPLETED as a scalar study: each trial's value is accuracy - weight x forgetting."""
    study = optuna.create_study(study_name="scalar", direction="maximize")
    study.set_user_attr("config", {"objective_mode": "scalar", "forgetting_weight": weight})
    for method, acc, forgetting, lr, _ in COMPLETED:
        trial = ask(study, method, lr)
        trial.set_user_attr("val_accuracy", acc)
        trial.set_user_attr("forgetting", forgetting)
        study.tell(trial, acc - weight * forgetting)
    return study


def test_a_scalar_study_is_reported_with_its_own_objectives_pick(tmp_path: Path) -> None:
    study = scalar_study()
    write_report(study, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    # 0.70 - 2 x 0.03 = 0.64 leads; the balanced rule would take trial 2 (0.78, forgetting 0.12)
    assert "Chosen trial: <b>#3</b> (ia3) by rule <code>best-scalar (forgetting weight 2)</code>" in page
    assert "<figcaption>The objective (accuracy - weight x forgetting) per trial" in page


def test_a_scalar_studys_table_shows_each_trials_objective(tmp_path: Path) -> None:
    write_report(scalar_study(), tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    head = page.split("<thead>")[-1].split("</thead>")[0]
    assert "<th>forgetting</th><th>objective</th>" in head
    row = page.split('<tr id="trial-3"')[1].split("</tr>")[0]  # ia3: 0.70 - 2 x 0.03
    assert '<td class="num">0.7000</td><td class="num">0.0300</td><td class="num">0.6400</td>' in row


def test_a_pareto_studys_table_has_no_objective_column(report: tuple[optuna.Study, list[Path], str]) -> None:
    assert "<th>objective</th>" not in report[2]


def test_the_page_says_what_the_study_ran_on(tmp_path: Path) -> None:
    from autopeft.config import SearchConfig

    config = SearchConfig(model="/models/tiny", task="/data/reviews.csv", task_type="causal_lm",
                          label_words=("bad", "good"), objective_mode="scalar", forgetting_weight=2.0,
                          pruner="hyperband", prune_after=5, max_steps=20, memory_budget=2**30, sampler="random")
    study = scalar_study()
    study.set_user_attr("config", config.public_dict())
    study.set_user_attr("split", {"labels": ["neg", "pos"], "train_size": 200, "validation_size": 100,
                                  "test_size": 100, "validation_majority": 0.55})
    study.set_user_attr("probe_names", ["perplexity", "factual_recall"])
    write_report(study, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    setup = page.split('<table id="setup">')[1].split("</table>")[0]
    rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", setup))
    assert rows == {"model": "/models/tiny", "task": "/data/reviews.csv (causal_lm)",
                    "objective": "accuracy - 2 x forgetting (scalar)", "sampler": "random, seed 0",
                    "pruner": "hyperband, after 5 steps", "steps per trial": "20", "memory budget": "1.0 GiB",
                    "probes": "perplexity (the forgetting objective), factual_recall",
                    "label words": "neg -&gt; bad, pos -&gt; good", "labels": "neg, pos", "rows": "200 train / 100 validation / 100 test",
                    "majority class": "0.5500 of validation (what a trial that learns nothing scores)"}


def test_many_open_answers_are_named_in_part_and_counted(tmp_path: Path) -> None:
    study = synthetic_study()
    study.set_user_attr("split", {"labels": [f"answer {i}" for i in range(40)]})
    write_report(study, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<th>labels</th><td>answer 0, answer 1," in page and "answer 11, ... (40 in all)</td>" in page
    assert "answer 12" not in page


def test_a_scalar_studys_history_plots_its_objective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autopeft import report

    study = scalar_study()
    saved = []
    monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig) or path)
    report.plot_history(study, tmp_path / "history.png")
    ax = saved[0].axes[0]
    assert ax.get_ylabel() == "objective (accuracy - 2 x forgetting)"
    best = next(line for line in ax.get_lines() if line.get_label() == "best so far")
    assert max(best.get_ydata()) == pytest.approx(0.64)  # trial 3's objective, the pick; not 0.81 accuracy


def test_a_method_tried_once_still_shows_its_own_parameters(tmp_path: Path) -> None:
    """Key params were only those whose value differed between trials: a LoRA trial among (IA)^3 ones showed
    its learning rate and not its rank."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for method in ("lora", "ia3", "ia3"):
        complete(study, method, 0.7, 0.01, 3e-3, 600)  # one learning rate for all: not a key parameter
    write_report(study, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    cells = re.findall(r'<tr id="trial-\d+"[^>]*><td class="num">\d+</td><td>complete</td><td>\w+</td><td>([^<]*)</td>',
                       page)
    assert cells == ["lora.r=16", "", ""]


def test_the_page_is_self_contained(report: tuple[optuna.Study, list[Path], str]) -> None:
    _, _, page = report
    assert page.count('src="data:image/png;base64,') == 4
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page


def test_a_study_without_completed_trials_still_gets_a_report(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    failed = study.ask()
    failed.set_user_attr("fail_reason", FAIL_REASON)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    paths = write_report(study, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "No completed trial" in page
    assert page.count('src="data:image/png;base64,') == 4


def test_an_empty_study_still_gets_a_report(tmp_path: Path) -> None:
    paths = write_report(optuna.create_study(directions=["maximize", "minimize"]), tmp_path / "new")
    assert [p.name for p in paths] == list(FILES)
    assert "No completed trial" in (tmp_path / "new" / "report.html").read_text(encoding="utf-8")


def test_when_fanova_fails_the_importance_plot_says_so(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def refuse(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(args)
        raise RuntimeError("conditional parameters")

    monkeypatch.setattr(optuna.importance, "get_param_importances", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_report(synthetic_study(), tmp_path)
    assert not [w for w in caught if issubclass(w.category, ReportWarning)]  # an expected fallback, not a bug
    assert calls and len(paths) == 5
    assert (tmp_path / "importance.png").read_bytes().startswith(PNG_SIGNATURE)


def test_confirmation_runs_kept_by_export_are_reported(tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, accuracy in enumerate((0.80, 0.78)):
        trial = study.ask()
        trial.set_user_attr("params", {"method": "lora", "learning_rate": 1e-3})
        trial.set_user_attr("seed", number)
        study.tell(trial, (accuracy, 0.02))
    study.set_user_attr("confirmation.trial-0", {"1000003": [0.70, 0.03], "2000006": ["loss became NaN <at> step 3"]})
    study.set_user_attr("confirmation.trial-1", {"1000004": [0.79, 0.01]})
    write_report(study, tmp_path)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    section = page.split("<h2>Confirmation runs</h2>")[1]
    assert section.index('id="confirmed-1"') < section.index('id="confirmed-0"')  # best mean first
    assert "<td class=\"num\">0.7850</td>" in section and "<td class=\"num\">0.7500</td>" in section
    assert "seed 2000006: loss became NaN &lt;at&gt; step 3" in section


def test_a_study_without_confirmation_runs_has_no_such_section(report: tuple[optuna.Study, list[Path], str]) -> None:
    assert "Confirmation runs" not in report[2]


def test_the_forgetting_probe_is_the_first_forgetting_one_and_a_rejected_trials_estimate_keeps_its_level() -> None:
    from autopeft.report import _memory_level, _probe_rows

    study = optuna.create_study()
    study.set_user_attr("probe_names", ["generalization_gap", "linear_probe"])  # the gap measures no forgetting
    assert _probe_rows(study) == [("probes", "linear_probe (the forgetting objective), generalization_gap")]
    rejected = study.ask()
    rejected.set_user_attr("memory_estimate", {"total": 2**30, "level": "traced"})
    study.tell(rejected, state=optuna.trial.TrialState.PRUNED)
    assert _memory_level(study.trials[0]) == "traced"


def test_a_rule_that_admits_no_trial_says_why_on_the_page(tmp_path: Path) -> None:
    """All trials completed and feasible: the page said 'no feasible completed trial', not the rule's reason."""
    write_report(synthetic_study(), tmp_path, rule="max-accuracy-under-forgetting=-1")
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert ('<p id="chosen">The rule <code>max-accuracy-under-forgetting=-1</code> chose no trial: no completed '
            "trial has forgetting &lt;= -1.0.</p>") in page


@pytest.mark.parametrize(("command", "directions"), [("report", ["maximize"]), ("export", ["maximize", "minimize"])])
def test_a_study_another_program_wrote_is_refused_in_one_line(tmp_path: Path, command: str,
                                                              directions: list[str]) -> None:
    """A plain Optuna study in the same database: export failed on its missing config (KeyError), and the
    report of a one-objective study, which has no forgetting to read, on an IndexError after creating --out."""
    from tests_support import autopeft_here

    study = optuna.create_study(study_name="theirs", storage=f"sqlite:///{tmp_path / 'theirs.db'}",
                                directions=directions)
    study.optimize(lambda t: tuple(t.suggest_float(f"x{i}", 0, 1) for i in range(len(directions))), n_trials=2)
    done = autopeft_here(command, "--study", "theirs", "--storage", "sqlite:///theirs.db", "--out", "out", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --study: 'theirs' was not written by `autopeft search`")
    assert len(done.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.db"]
