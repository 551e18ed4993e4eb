"""Does the causal-LM path learn a task with open answers (exact match on a generated answer), on SmolLM2?

The task: word-form questions built from gensim's packaged `questions-words.txt` grammar sections (plural,
past tense, comparative, superlative, adverb, present participle, nationality adjective, third person),
e.g. "What is the plural of 'banana'?" -> "bananas". Every answer is its own: 284 questions, 284 distinct
answers, so the split is a seeded random one and no validation or test answer occurs in train. The capital
sections are left out: the factual-recall forgetting probe asks capitals.

One `autopeft search` (the shipped default space, TPE, 4 trials x 30 steps) against the base model's own
answers to the same prompts; the chosen trial is exported (`autopeft export`'s default rule), which scores
it once on the held-out test rows.

    .venv/bin/python experiments/open_answers/run.py [--markdown]
Writes results.json and results.md next to this file (about 7 minutes on 2 CPU cores); --markdown only
rewrites results.md from results.json.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from autopeft.config import SearchConfig
from autopeft.evaluate import generate_greedy, split_prompts
from autopeft.export import export_trial
from autopeft.probes import QUESTIONS_FILE, _gensim_test_file
from autopeft.search import prepare_runtime, run_search
from autopeft.study import scores

HERE = Path(__file__).resolve().parent
COMMAND = "python experiments/open_answers/run.py"
QUESTIONS = {  # questions-words.txt section -> question asked about its first word
    "gram1-adjective-to-adverb": "What is the adverb of '{}'?",
    "gram3-comparative": "What is the comparative of '{}'?",
    "gram4-superlative": "What is the superlative of '{}'?",
    "gram5-present-participle": "What is the present participle of '{}'?",
    "gram6-nationality-adjective": "What is the nationality adjective of '{}'?",
    "gram7-past-tense": "What is the past tense of the verb in '{}'?",
    "gram8-plural": "What is the plural of '{}'?",
    "gram9-plural-verbs": "What is the third person singular of '{}'?",
}  # gram7's first word is a present participle ("dancing danced"): asked for its verb's past tense


def question_rows() -> list[dict[str, str]]:
    """Distinct (word, form) pairs of the chosen sections, as question / answer rows in file order."""
    rows, seen, section = [], set(), None
    for line in _gensim_test_file(QUESTIONS_FILE).read_text().splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        if section not in QUESTIONS:
            continue
        a, b, c, d = line.split()
        for word, form in ((a, b), (c, d)):
            if (section, word) not in seen:
                seen.add((section, word))
                rows.append({"question": QUESTIONS[section].format(word), "answer": form})
    return rows


def main() -> None:
    rows = question_rows()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        task = work / "word_forms.jsonl"
        task.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = SearchConfig(
            model="packaged:SmolLM2-135M-Instruct", task=str(task), task_type="causal_lm", causal_eval="generate",
            text_column="question", label_column="answer", template="Question: {text}\nAnswer:",
            train_size=160, val_size=62, test_size=62, max_length=48, trials=4, max_steps=30, seed=0,
            study="open-answers", storage=f"sqlite:///{work / 'o.db'}", tracking_uri=f"sqlite:///{work / 'm.db'}",
            artifacts_dir=str(work / "a"))
        started = time.perf_counter()
        study = run_search(config).study
        search_seconds = time.perf_counter() - started
        runtime = prepare_runtime(config)
        base_test = runtime.evaluate(runtime.base_model, runtime.test, runtime.device)
        base_says = base_answers(runtime)
        exported = export_trial(config.study, config.storage, work / "export")
        result = {
            "command": COMMAND, "machine": f"{platform.machine()}, {platform.python_version()}",
            "rows": len(rows), "distinct_answers": len({r["answer"] for r in rows}), "split": study.user_attrs["split"],
            "base_val_accuracy": study.user_attrs["base_val_accuracy"], "base_test_accuracy": base_test,
            "trials": [{"number": t.number, "state": t.state.name, "params": t.user_attrs.get("params"),
                        **({"val_accuracy": scores(t)[0], "forgetting": scores(t)[1]}
                           if t.state.name == "COMPLETE" else {})} for t in study.trials],
            "chosen": {"trial": exported.trial.number, "val_accuracy": scores(exported.trial)[0],
                       "forgetting": scores(exported.trial)[1], "test_accuracy": exported.test_accuracy},
            "search_seconds": search_seconds, "base_answers": base_says,
        }
    (HERE / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (HERE / "results.md").write_text(markdown(result))
    print(markdown(result))


def base_answers(runtime, rows: int = 6, tokens: int = 20) -> list[dict[str, str]]:
    """What the base model says to the first validation prompts, given more tokens than scoring allows."""
    fmt = runtime.evaluate.causal
    prompts, golds = split_prompts(runtime.validation, fmt)
    said = generate_greedy(runtime.base_model, prompts[:rows], max_new_tokens=tokens, pad_id=runtime.pad_id,
                           eos_id=fmt.eos_id)
    decode = runtime.tokenizer.decode
    return [{"question": decode(p, skip_special_tokens=True).split("Question: ")[-1].split("\n")[0],
             "answer": fmt.label_words[g], "base_says": decode(s, skip_special_tokens=True).strip()}
            for p, g, s in zip(prompts, golds, said, strict=False)]


def markdown(r: dict) -> str:
    split = r["split"]
    lines = [
        "# Open answers on the causal-LM path: word forms, SmolLM2-135M-Instruct",
        "",
        f"Command: `{r['command']}` ({r['machine']}, CPU only)  ",
        (f"Task: {r['rows']} questions, {r['distinct_answers']} distinct answers; split train / validation / test "
        f"{split['train_size']} / {split['validation_size']} / {split['test_size']} "
        f"({split['validation_origin']}). Accuracy: the greedy answer, normalised, equal to the row's answer. "
        "Forgetting: the decoders' default objective, the relative increase of the perplexity of general text "
        "(Wikipedia paragraphs) over the base model's."),
        "",
        "| model | val exact match | test exact match | forgetting |",
        "|---|---|---|---|",
        f"| base model, same prompts | {r['base_val_accuracy']:.3f} | {r['base_test_accuracy']:.3f} | 0 |",
    ]
    for t in r["trials"]:
        if "val_accuracy" in t:
            chosen = t["number"] == r["chosen"]["trial"]
            test = f"{r['chosen']['test_accuracy']:.3f}" if chosen else "-"
            lines.append(f"| trial {t['number']}{' (chosen)' if chosen else ''}: {describe(t['params'])} | "
                         f"{t['val_accuracy']:.3f} | {test} | {t['forgetting']:.4f} |")
        else:
            lines.append(f"| trial {t['number']}: {describe(t['params'])} | {t['state'].lower()} | | |")
    lines += ["", f"Search wall time: {r['search_seconds']:.0f} s (4 trials x 30 steps).", "",
              ("Scoring generates at most the longest answer's tokens plus end-of-sequence. What the base model "
               "says to the first validation questions, given 20 tokens:"), ""]
    lines += [f"- {a['question']} (answer: {a['answer']}) -> {a['base_says']!r}" for a in r["base_answers"]]
    lines.append("")
    return "\n".join(lines)


def describe(params: dict | None) -> str:
    if not params:
        return "-"
    own = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in params.items() if "." in k)
    return f"{params['method']} ({own}), lr {params['learning_rate']:.2g}"


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        (HERE / "results.md").write_text(markdown(json.loads((HERE / "results.json").read_text())))
    else:
        main()
