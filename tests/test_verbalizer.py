"""Classification as generation: prompt + label-word tokenization, and accuracy by ranking or generating."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tests_support import tiny_config

from autopeft.data import TextSplit, collate
from autopeft.errors import ConfigError, DataError
from autopeft.evaluate import Evaluator, causal_accuracy, choice_log_likelihoods, normalize_answer
from autopeft.train import TrainSettings, causal_lm_loss, fit
from autopeft.verbalizer import causal_format, tokenize_causal

WORDS = ["fresh", "rotten"]


def _causal(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _byte_level_tokenizer(corpus: list[str]):
    """A GPT-2-style byte-level BPE learned from `corpus`: it keeps spaces and merges punctuation across the text
    and the template, as real decoders' tokenizers do and the tiny models' WordPiece does not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


def test_prompt_positions_are_not_learned_and_only_the_text_is_truncated(tiny_causal_models: dict[str, Path]) -> None:
    _, tokenizer = _causal(tiny_causal_models["llama"])
    split = TextSplit(["a good film", "dull " * 50], [0, 1])
    tokenized = tokenize_causal(split, tokenizer, 16, WORDS)
    assert tokenized.pad_left
    first = tokenizer.convert_ids_to_tokens(tokenized.input_ids[0])
    assert first == ["[CLS]", "text", ":", "a", "good", "film", "label", ":", "fresh"]  # no [SEP] before the answer
    assert tokenized.labels[0] == [-100] * 8 + [tokenizer.convert_tokens_to_ids("fresh")]
    second = tokenizer.convert_ids_to_tokens(tokenized.input_ids[1])
    assert len(second) == 16 and second[-3:] == ["label", ":", "rotten"]  # the text lost its end, not the cue
    batch = collate(tokenized, [0, 1], tokenizer.pad_token_id)  # padding is never a target either
    assert batch["labels"][0].tolist() == [-100] * 15 + [tokenizer.convert_tokens_to_ids("fresh")]


def test_a_truncated_prompt_does_not_depend_on_its_rows_answer(tiny_causal_models: dict[str, Path]) -> None:
    """Prompts were cut to leave room for the row's own answer, so with a one-token and a two-token label word the
    same long text kept one token more under the shorter: the prompt's length gave the answer away (a model
    reached 1.0 on coin-flip labels). Each prompt now leaves room for the longest answer."""
    _, tokenizer = _causal(tiny_causal_models["llama"])
    text = "the movie was long and slow and the plot made little sense to anyone watching it"
    words = ["bad", "very good"]
    tokenized = tokenize_causal(TextSplit([text, text], [0, 1]), tokenizer, 16, words)
    prompts = [ids[:labels.count(-100)] for ids, labels in zip(tokenized.input_ids, tokenized.labels, strict=True)]
    assert prompts[0] == prompts[1]
    assert len(tokenized.input_ids[1]) == 16 and len(tokenized.input_ids[0]) == 15  # the short answer's row is shorter


def test_truncation_never_cuts_a_template_character_a_token_shares_with_the_text() -> None:
    """A byte-level BPE merges a review's last '.' with the template's closing quote ('."'): counted as text, that
    token was cut with the text and the truncated rows lost the quote every other row has."""
    template, text = 'Review: "{text}"\nSentiment:', "The movie was long and slow, and the plot made no sense."
    tokenizer = _byte_level_tokenizer([template.format(text=text) + " bad"])
    assert '."' in tokenizer.tokenize(template.format(text=text))  # the shared token the test is about
    whole = tokenize_causal(TextSplit([text], [0]), tokenizer, 64, ["bad", "good"], template)
    cut = tokenize_causal(TextSplit([text], [0]), tokenizer, len(whole.input_ids[0]) - 3, ["bad", "good"], template)
    decoded = tokenizer.decode(cut.input_ids[0], skip_special_tokens=True)
    assert decoded.startswith('Review: "The') and decoded.endswith('"\nSentiment: bad') and len(decoded) < len(text)


def test_a_template_ending_in_a_space_gives_one_space_before_the_answer(tiny_causal_models: dict[str, Path]) -> None:
    """The answer comes after a space of its own: 'Label: ' trained and scored on 'Label:  bad', and the export
    told users to add a space after the template."""
    tokenizer = _byte_level_tokenizer(["Text: great film\nLabel: bad", "Text: dull film\nLabel: good"])
    spaced = tokenize_causal(TextSplit(["great film"], [0]), tokenizer, 32, ["bad", "good"], "Text: {text}\nLabel: ")
    plain = tokenize_causal(TextSplit(["great film"], [0]), tokenizer, 32, ["bad", "good"], "Text: {text}\nLabel:")
    assert spaced.input_ids == plain.input_ids
    assert tokenizer.decode(spaced.input_ids[0], skip_special_tokens=True) == "Text: great film\nLabel: bad"
    assert causal_format(tokenizer, ["bad", "good"], "Text: {text}\nLabel: ").template == "Text: {text}\nLabel:"


def test_pairs_fill_the_pair_template(tiny_causal_models: dict[str, Path]) -> None:
    _, tokenizer = _causal(tiny_causal_models["gpt2"])
    split = TextSplit(["a cat"], [1], pairs=["an animal"])
    tokenized = tokenize_causal(split, tokenizer, 32, WORDS, "Premise: {text}\nHypothesis: {text_pair}\nAnswer:")
    assert tokenizer.decode(tokenized.input_ids[0]) == "[CLS] premise : a cat hypothesis : an animal answer : rotten"


def test_a_literal_brace_pair_field_is_text_not_the_second_text(tiny_causal_models: dict[str, Path]) -> None:
    """'{{text_pair}}' is the literal text {text_pair}: a pair task prompted with it silently lost its second
    text, and a single-text task was refused for it."""
    _, tokenizer = _causal(tiny_causal_models["gpt2"])
    literal = "Premise: {text} Hypothesis: {{text_pair}}\nAnswer:"
    with pytest.raises(DataError, match=r"must contain \{text_pair\} exactly when the task has a second text column "
                                        r"\(it has\)"):
        tokenize_causal(TextSplit(["a cat"], [1], pairs=["an animal"]), tokenizer, 32, WORDS, literal)
    single = tokenize_causal(TextSplit(["a cat"], [1]), tokenizer, 32, WORDS, literal)
    assert "hypothesis : { text _ pair }" in tokenizer.decode(single.input_ids[0])


@pytest.mark.parametrize(("words", "template", "message"), [
    (["fresh", "fresh"], "{text} Label:", r"--label-words: 'fresh' and 'fresh' tokenize to the same tokens"),
    (["fresh", " "], "{text} Label:", r"--label-words: .*empty label word"),
    (["fresh"], "{text} Label:", r"--label-words: 1 words for 2 classes"),
    (WORDS, "Label:", r"--template: 'Label:' must contain \{text\}"),
    (WORDS, "{text} {other}", r"--template: .*no other fields; found: other, text"),
    (WORDS, "{text} {text_pair}", r"--template: .*must contain \{text_pair\} exactly when the task has a second text"),
    # only one copy could be cut to fit --max-length, and the other was blamed on the template
    (WORDS, "Review: {text}\nAgain: {text}\nLabel:", r"--template: .* holds \{text\} more than once; give each field once"),
])
def test_bad_verbalizers_are_named(tiny_causal_models: dict[str, Path], words: list[str], template: str,
                                   message: str) -> None:
    _, tokenizer = _causal(tiny_causal_models["llama"])
    with pytest.raises(DataError, match=message):
        tokenize_causal(TextSplit(["a", "b"], [0, 1]), tokenizer, 16, words, template)


def test_a_too_short_max_length_names_the_template(tiny_causal_models: dict[str, Path]) -> None:
    _, tokenizer = _causal(tiny_causal_models["llama"])
    with pytest.raises(DataError, match=r"^--max-length: 4 leaves no room for the text: the template 'a long "
                                        r"instruction before \{text\} then Label:' takes 8 tokens and the answer "
                                        r"'fresh' 1; use --max-length 10 or more$"):
        tokenize_causal(TextSplit(["a b c"], [0]), tokenizer, 4, WORDS, "a long instruction before {text} then Label:")


@pytest.mark.parametrize("pairs", [None, ["a second text"]])
def test_a_max_length_that_leaves_only_the_template_is_refused(tiny_causal_models: dict[str, Path],
                                                                pairs: list[str] | None) -> None:
    """At 6 the rows were '[CLS] text : label : fresh': trained on prompts with no text, without a word."""
    _, tokenizer = _causal(tiny_causal_models["llama"])
    template = "Text: {text}\nSecond: {text_pair}\nLabel:" if pairs else "Text: {text}\nLabel:"
    split = TextSplit(["this film was wonderful and moving"], [0], pairs=pairs)
    shortest = 10 if pairs else 7  # the template (7 tokens, 5), a token of each text, the answer (no end-of-sequence)
    for max_length in (shortest - 2, shortest - 1):
        with pytest.raises(DataError, match=rf"^--max-length: {max_length} leaves no room for the text: .*; use "
                                            rf"--max-length {shortest} or more$"):
            tokenize_causal(split, tokenizer, max_length, WORDS, template)
    rows = tokenize_causal(split, tokenizer, shortest, WORDS, template)
    kept = tokenizer.convert_ids_to_tokens(rows.input_ids[0])
    assert len(kept) == shortest and "this" in kept and ("a" in kept) == bool(pairs)


def test_an_answer_longer_than_max_length_is_named(tiny_causal_models: dict[str, Path]) -> None:
    """It was blamed on the template: 'the template ... alone needs 5 tokens, more than the -52 left'."""
    _, tokenizer = _causal(tiny_causal_models["llama"])
    long = "a very long answer " + " ".join(f"word{i}" for i in range(40))
    split = TextSplit(["question 0", "question 1"], [0, 1])
    message = (r"^--max-length: 16 is too short for the answer 'a very long answer word0 word1 word2 \.\.\.' "
               r"\((?P<source>.*)\): it takes 84 tokens, and its prompt at least 6; use "
               r"--max-length 90 or more$")
    with pytest.raises(DataError, match=message.replace("(?P<source>.*)", "--label-words")):
        tokenize_causal(split, tokenizer, 16, ["answer 0", long])
    column = "--task: the labels in column 'answer'"  # the default words: the task's answers
    with pytest.raises(DataError, match=message.replace("(?P<source>.*)", re.escape(column))):
        tokenize_causal(split, tokenizer, 16, ["answer 0", long], source=column)
    assert len(tokenize_causal(split, tokenizer, 90, ["answer 0", long]).input_ids[1]) == 90


def test_choice_scores_match_summed_token_log_probabilities(tiny_causal_models: dict[str, Path]) -> None:
    model, tokenizer = _causal(tiny_causal_models["gpt2"])
    prompts = [[101, 2023, 2003], [101, 2204]]
    choices = [[4840], [11083, 2143]]  # one single-token and one two-token answer
    scores = choice_log_likelihoods(model, prompts, choices, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            for c, choice in enumerate(choices):
                log_probs = model(input_ids=torch.tensor([prompt + choice])).logits[0].log_softmax(-1)
                expected = sum(float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(choice))
                assert float(scores[p, c]) == pytest.approx(expected, abs=1e-4)


def test_normalization_ignores_case_punctuation_and_spacing() -> None:
    assert normalize_answer("  Positive. ") == normalize_answer("positive") == "positive"
    assert normalize_answer("not  bad!") == "not bad"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_model_that_always_answers_one_label_scores_the_majority_rate(tiny_causal_models: dict[str, Path],
                                                                       family: str) -> None:
    model, tokenizer = _causal(tiny_causal_models[family])
    train = TextSplit([f"review number {i}" for i in range(32)], [0] * 32)
    validation = TextSplit([f"review number {i}" for i in range(40, 50)], [0] * 7 + [1] * 3)
    fit(model, tokenize_causal(train, tokenizer, 32, WORDS), TrainSettings(learning_rate=1e-2, max_steps=12,
        micro_batch_size=16), pad_id=tokenizer.pad_token_id, loss_fn=causal_lm_loss)
    fmt = causal_format(tokenizer, WORDS)
    tokenized = tokenize_causal(validation, tokenizer, 32, WORDS)
    assert causal_accuracy(model, tokenized, fmt, pad_id=tokenizer.pad_token_id) == pytest.approx(0.7)
    generated = causal_accuracy(model, tokenized, fmt, pad_id=tokenizer.pad_token_id, mode="generate",
                                tokenizer=tokenizer)
    assert generated == pytest.approx(0.7)
    evaluator = Evaluator(tokenizer.pad_token_id, causal=fmt)
    assert evaluator(model, tokenized) == pytest.approx(0.7)


def test_label_words_must_name_every_class() -> None:
    from autopeft.verbalizer import label_words_problem

    assert label_words_problem(["good", "bad"], ["neg", "pos"]) is None
    problem = label_words_problem(["good"], ["neg", "pos"])
    assert problem is not None and problem.startswith("--label-words: 1 word (good) for 2 classes (neg, pos)")


def test_a_search_names_wrong_label_words_once_before_training(tmp_path: Path, tiny_bert: Path,
                                                              tiny_causal_models: dict[str, Path]) -> None:
    from autopeft.search import prepare_runtime

    config = tiny_config(tmp_path, tiny_bert, model=str(tiny_causal_models["llama"]), task_type="causal_lm",
                         label_words=("good",))
    with pytest.raises(ConfigError) as caught:
        prepare_runtime(config)
    assert str(caught.value).startswith("--label-words: 1 word (good) for 2 classes")


def test_label_words_rank_mode_could_never_answer_are_refused_before_a_new_search(
        tmp_path: Path, tiny_bert: Path, tiny_causal_models: dict[str, Path]) -> None:
    """Rank mode scores each word's tokens after the prompt: 'New' scores at least what 'New York' does, so a
    model right on every row read 50% on these two. A new search is refused them; loading them (as export and
    train of a study recorded before do) is not."""
    from autopeft.search import prepare_runtime, run_search

    config = tiny_config(tmp_path, tiny_bert, model=str(tiny_causal_models["llama"]), task_type="causal_lm",
                         label_words=("new", "new york"), trials=1)
    with pytest.raises(ConfigError) as caught:
        run_search(config)
    assert str(caught.value).startswith("--label-words: 'new' is how 'new york' begins once tokenized, so "
                                        "--causal-eval rank could never answer the longer one")
    assert not (tmp_path / "o.db").exists()  # refused before the study was created
    prepare_runtime(config)


def test_generate_mode_matches_an_answer_as_the_tokenizer_decodes_its_label_word(
        tiny_causal_models: dict[str, Path]) -> None:
    """A WordPiece decode spaces punctuation ('U.S.' reads 'u. s.'): a model answering with exactly the label
    word's tokens scored 0 in generate mode."""
    from types import SimpleNamespace

    _, tokenizer = _causal(tiny_causal_models["llama"])
    words = ["U.S.", "U.K."]
    fmt = causal_format(tokenizer, words, "Text: {text}\nLabel:")
    split = tokenize_causal(TextSplit(["made in america", "made in britain"], [0, 1]), tokenizer, 64, words,
                            "Text: {text}\nLabel:")

    class Answers(torch.nn.Module):  # answers each prompt with its own label word's tokens, then stops
        def forward(self, input_ids, attention_mask, **_):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
                seen = ids[mask.bool()].tolist()
                label = int("britain" in tokenizer.decode(seen))
                answer = list(fmt.answer_ids[label])
                given = next(n for n in range(len(answer), -1, -1) if n == 0 or seen[-n:] == answer[:n])
                logits[row, -1, answer[given] if given < len(answer) else tokenizer.sep_token_id] = 10.0
            return SimpleNamespace(logits=logits)

    assert causal_accuracy(Answers(), split, fmt, pad_id=tokenizer.pad_token_id, mode="generate",
                           tokenizer=tokenizer) == 1.0

    class Silent(torch.nn.Module):  # answers nothing: a special token only, which the decode drops
        def forward(self, input_ids, attention_mask, **_):
            logits = torch.zeros(*input_ids.shape, len(tokenizer))
            logits[:, -1, tokenizer.sep_token_id] = 10.0
            return SimpleNamespace(logits=logits)

    unknown = ["\U0001F44D", "good"]  # a word of unknown tokens decodes to nothing: it must not match no answer
    fmt = causal_format(tokenizer, unknown, "Text: {text}\nLabel:")
    split = tokenize_causal(TextSplit(["liked it", "good"], [0, 1]), tokenizer, 64, unknown, "Text: {text}\nLabel:")
    assert causal_accuracy(Silent(), split, fmt, pad_id=tokenizer.pad_token_id, mode="generate",
                           tokenizer=tokenizer) == 0.0


def test_a_causal_search_on_an_encoder_is_refused_before_training(tmp_path: Path, tiny_bert: Path) -> None:
    from autopeft.search import prepare_runtime

    with pytest.raises(ConfigError, match=r"^--task-type causal_lm: .* is an encoder \(bert\); use a decoder"):
        prepare_runtime(tiny_config(tmp_path, tiny_bert, task_type="causal_lm"))


def test_a_causal_trials_memory_estimate_counts_its_vocabulary_logits(tmp_path: Path, tiny_bert: Path,
                                                                     tiny_causal_models: dict[str, Path]) -> None:
    from autopeft.memory.analytic import logits_bytes
    from autopeft.search import prepare_runtime, run_search

    config = tiny_config(tmp_path, tiny_bert, model=str(tiny_causal_models["llama"]), task_type="causal_lm",
                         trials=1, max_steps=2, train_size=30, val_size=15, test_size=15)
    trial = run_search(config).study.trials[0]
    runtime = prepare_runtime(config)
    params = trial.user_attrs["params"]
    logits = logits_bytes(runtime.base_model, micro_batch_size=params["micro_batch_size"],
                          seq_len=runtime.longest_row, precision=params["precision"], task_type="CAUSAL_LM")
    assert trial.user_attrs["memory_estimate"]["activations"] >= logits > 0


@pytest.mark.parametrize(("option", "value"), [("label_words", ("good", "bad")), ("template", "{text} Label:"),
                                               ("causal_eval", "generate")])
def test_the_causal_lm_options_are_refused_for_a_classification_task(tmp_path: Path, tiny_bert: Path,
                                                                     option: str, value: object) -> None:
    flag = "--" + option.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag}: applies to --task-type causal_lm only"):
        tiny_config(tmp_path, tiny_bert, **{option: value})


def _question_file(path: Path, rows: int = 60) -> Path:
    """Questions whose answers are open text, nearly one per row: no closed set of classes to stratify."""
    lines = "".join(f'{{"question": "What is 2 plus {i}?", "answer": "{2 + i}"}}\n' for i in range(rows))
    path.write_text(lines)
    return path


def test_open_answers_split_at_random_and_need_not_occur_in_train(tmp_path: Path) -> None:
    from autopeft.data import Columns, load_task

    task_file = _question_file(tmp_path / "qa.jsonl")
    columns = Columns(text="question", label="answer")
    with pytest.raises(DataError, match="cannot split 60 rows by class"):  # as classes: one row each
        load_task(str(task_file), seed=0, train_size=30, val_size=15, test_size=15, columns=columns)
    task = load_task(str(task_file), seed=0, train_size=30, val_size=15, test_size=15, columns=columns,
                     open_answers=True)
    assert [len(s.texts) for s in task.splits().values()] == [30, 15, 15]
    assert task.origins["validation"].startswith("seeded random (answers too varied to stratify) split")
    assert not set(task.validation.labels) & set(task.train.labels)  # every answer is new
    again = load_task(str(task_file), seed=0, train_size=30, val_size=15, test_size=15, columns=columns,
                      open_answers=True)
    assert again.validation.fingerprint() == task.validation.fingerprint()  # seeded


@pytest.mark.parametrize(("per_answer", "sizes"), [(3, (20, 6, 6)), (4, (50, 40, 40))])
def test_open_answers_with_more_answers_than_a_split_holds_split_at_random(tmp_path: Path, per_answer: int,
                                                                          sizes: tuple[int, int, int]) -> None:
    """40 answers of 3 rows each were refused ("a train split of 20 rows cannot hold a row of each of the 40
    classes") where answers of 2 rows each were split at random; 4 each failed the split by class itself."""
    from autopeft.data import load_task

    rows = [f'{{"text": "question {a} variant {k}", "label": "answer{a}"}}\n' for a in range(40) for k in range(per_answer)]
    (tmp_path / "qa.jsonl").write_text("".join(rows))
    train, val, test = sizes
    task = load_task(str(tmp_path / "qa.jsonl"), seed=0, train_size=train, val_size=val, test_size=test,
                     open_answers=True)
    assert [len(s.texts) for s in task.splits().values()] == list(sizes)
    assert {task.origins[s] for s in ("train", "validation", "test")} == {
        "seeded random (answers too varied to stratify) split of file qa.jsonl"}


def test_label_words_generate_mode_cannot_tell_apart_are_refused() -> None:
    """'yes' and 'yes.' both matched an answer 'yes': a model that always said it scored 100%."""
    from autopeft.verbalizer import generated_answers_problem

    assert generated_answers_problem(["yes", "Yes."]) == (
        "--label-words: 'yes' and 'Yes.' are the same answer once normalized (case, punctuation and spaces dropped), "
        "as --causal-eval generate compares them; choose words that differ")
    assert generated_answers_problem(["yes", "no"]) is None


def test_label_words_that_decode_alike_are_refused_before_a_generate_search(tmp_path: Path,
                                                                          tiny_causal_models: dict[str, Path]) -> None:
    """A WordPiece decode reads 'U.S.' as 'u. s.', which normalizes as 'u s' does: generate mode compares the
    decoded words, so a model that always answered 'u s' scored 100%. Refused before the search, not once normalized
    as written (they differ there)."""
    from autopeft.search import prepare_runtime
    from autopeft.verbalizer import decoded_answers_problem, generated_answers_problem

    _, tokenizer = _causal(tiny_causal_models["llama"])
    assert generated_answers_problem(["U.S.", "u s"]) is None
    assert decoded_answers_problem(causal_format(tokenizer, ["U.S.", "U.K."]), tokenizer) is None
    (tmp_path / "task.csv").write_text("text,label\n" + "".join(f"row {i},{['us', 'uk'][i % 2]}\n" for i in range(40)))
    settings = tiny_config(tmp_path, tiny_causal_models["llama"], task=str(tmp_path / "task.csv"), train_size=20,
                           val_size=10, test_size=10, task_type="causal_lm", causal_eval="generate",
                           label_words=("U.S.", "u s"))
    with pytest.raises(ConfigError, match=r"^--label-words: 'U.S.' and 'u s' are the same answer as this tokenizer "
                                          r"decodes them \('u s' once normalized\)"):
        prepare_runtime(settings)


def test_a_sign_or_decimal_point_before_a_digit_is_kept_when_answers_are_compared() -> None:
    """Labels -1 / 0 / 1 normalized to 1 / 0 / 1: in generate mode a model that always said '1' was right on every
    '-1' row. A full stop or apostrophe still changes no answer."""
    assert normalize_answer("-1") == "-1" != normalize_answer("1")
    assert normalize_answer("1.5") == "1.5" != normalize_answer("15")
    assert normalize_answer("42.") == normalize_answer("42") and normalize_answer("U.S.") == normalize_answer("us")
    assert normalize_answer("well-known") == normalize_answer("wellknown")
    from autopeft.verbalizer import generated_answers_problem

    assert generated_answers_problem(["-1", "0", "1"]) is None


def test_open_answers_that_differ_only_in_surrounding_spaces_are_one_answer(tmp_path: Path) -> None:
    """They were two classes whose tokens clash, blamed on a --label-words the user never gave."""
    from autopeft.data import Columns, load_task

    rows = [f'{{"question": "q{i}", "answer": "{i % 3}{" " if i == 4 else ""}"}}' for i in range(30)]
    (tmp_path / "qa.jsonl").write_text("\n".join(rows) + "\n")
    task = load_task(str(tmp_path / "qa.jsonl"), seed=0, train_size=15, val_size=6, test_size=6,
                     columns=Columns(text="question", label="answer"), open_answers=True)
    assert task.label_names == ["0", "1", "2"]


def test_a_generated_answer_equal_to_its_rows_after_normalization_is_right(
        tiny_causal_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Open answers can differ only where normalization drops it ("Paris" and "paris."): the row's own
    answer counts, not whichever of them a lookup of the normalized text would name."""
    from autopeft import evaluate

    model, tokenizer = _causal(tiny_causal_models["llama"])
    words = ["Paris", "paris.", "Rome"]
    split = TextSplit(["capital of France", "capital of France again", "capital of Italy"], [1, 0, 2])
    fmt = causal_format(tokenizer, words)
    said = [tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in ("paris", "PARIS", "rome!")]
    monkeypatch.setattr(evaluate, "generate_greedy", lambda *args, **kwargs: said)
    tokenized = tokenize_causal(split, tokenizer, 32, words)
    assert causal_accuracy(model, tokenized, fmt, pad_id=tokenizer.pad_token_id, mode="generate",
                           tokenizer=tokenizer) == 1.0


def test_a_label_word_of_punctuation_alone_never_matches_an_empty_answer(
        tiny_causal_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """'?' normalizes to nothing, as does a model's silence (only end-of-sequence) or a bare '!': every '?' row
    counted as right for a model that said nothing. As --label-words such a word is refused up front."""
    from autopeft import evaluate
    from autopeft.verbalizer import generated_answers_problem

    model, tokenizer = _causal(tiny_causal_models["llama"])
    words = ["?", "yes", "no"]
    split = TextSplit(["is it?", "it is", "it is not"], [0, 1, 2])
    fmt = causal_format(tokenizer, words)
    tokenized = tokenize_causal(split, tokenizer, 32, words)
    for said in ([], tokenizer(" !", add_special_tokens=False)["input_ids"]):
        monkeypatch.setattr(evaluate, "generate_greedy", lambda *args, said=said, **kwargs: [said] * 3)
        assert causal_accuracy(model, tokenized, fmt, pad_id=tokenizer.pad_token_id, mode="generate",
                               tokenizer=tokenizer) == 0.0
    assert generated_answers_problem(words) == (
        "--label-words: '?' is nothing once normalized (case, punctuation and spaces dropped), as --causal-eval "
        "generate compares answers, so no answer could match it; choose words with a letter or digit, or use "
        "--causal-eval rank")


def test_free_answers_ranked_as_classes_are_pointed_to_generate_mode(
        tmp_path: Path, tiny_bert: Path, tiny_causal_models: dict[str, Path]) -> None:
    from autopeft.search import run_search

    config = tiny_config(tmp_path, tiny_bert, model=str(tiny_causal_models["llama"]), task_type="causal_lm",
                         task=str(_question_file(tmp_path / "qa.jsonl")), text_column="question",
                         label_column="answer", train_size=30, val_size=15, test_size=15)
    with pytest.raises(DataError, match=r"cannot split 60 rows by class .*; if the labels are free answers "
                                        r"\(question answering\), --causal-eval generate scores them as such"):
        run_search(config)


def test_a_task_answer_generate_mode_could_never_match_is_refused(
        tmp_path: Path, tiny_bert: Path, tiny_causal_models: dict[str, Path]) -> None:
    """Classes '+' and '-' as their own label words: generate mode scored every row 0 whatever the model said."""
    from autopeft.search import run_search

    (tmp_path / "signs.csv").write_text("text,label\n" + "".join(f"row {i},{'+-'[i % 2]}\n" for i in range(60)))
    config = tiny_config(tmp_path, tiny_bert, model=str(tiny_causal_models["llama"]), task_type="causal_lm",
                         causal_eval="generate", task=str(tmp_path / "signs.csv"), train_size=30, val_size=15,
                         test_size=15)
    with pytest.raises(ConfigError, match=r"^--task: the labels in column 'label': '\+' is nothing once normalized .* "
                                          r"choose words with a letter or digit \(--label-words\), or use --causal-eval rank"):
        run_search(config)
    assert not (tmp_path / "o.db").exists()


def test_a_causal_search_on_open_answers_trains_and_scores_generated_answers(
        tmp_path: Path, tiny_bert: Path, tiny_causal_models: dict[str, Path]) -> None:
    from autopeft.search import run_search

    ood = tmp_path / "ood.jsonl"  # other questions, answers the task never has
    ood.write_text("".join(f'{{"question": "What is 500 plus {i}?", "answer": "{500 + i}"}}\n' for i in range(8)))
    config = tiny_config(tmp_path, tiny_bert, model=str(tiny_causal_models["llama"]), task_type="causal_lm",
                         causal_eval="generate", task=str(_question_file(tmp_path / "qa.jsonl")),
                         text_column="question", label_column="answer", template="Q: {text}\nA:",
                         trials=1, max_steps=2, train_size=30, val_size=15, test_size=15, ood_task=str(ood))
    study = run_search(config).study
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert "probe.ood_accuracy" in study.trials[0].user_attrs  # scored on its own answers, not refused
    assert "random" in study.user_attrs["split"]["validation_origin"]
    from autopeft.export import export_trial

    export_trial(config.study, config.storage, tmp_path / "export")  # says how its accuracy was generated
    metrics = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert metrics["generate_max_new_tokens"] >= 1 and metrics["generate_stops_at_eos"] is False
    card = (tmp_path / "export" / "README.md").read_text()
    assert f"max_new_tokens={metrics['generate_max_new_tokens']}" in card
    assert "## Prompting" in card and "```\nQ: {text}\nA:\n```" in card and "Accuracy generates greedily" in card
    assert metrics["template"] == "Q: {text}\nA:" and metrics["answer_words"]["7"] == "7"


def test_a_rank_scored_cards_prompting_pairs_each_label_with_its_word() -> None:
    from autopeft.export import _prompting_section

    section = _prompting_section({"template": "Text: {text}\nLabel:", "causal_eval": "rank",
                                  "answer_words": {"negative": "good", "positive": "bad"}})
    assert "| 'negative' | 'good' |\n| 'positive' | 'bad' |" in section
    assert "highest summed log-probability" in section and "text_pair" not in section


def test_an_ood_sets_own_answers_are_appended_to_the_tasks(tmp_path: Path) -> None:
    from autopeft.data import Columns, load_task, with_eval_answers

    columns = Columns(text="question", label="answer")
    task = load_task(str(_question_file(tmp_path / "qa.jsonl", rows=20)), seed=0, train_size=10, val_size=5,
                     test_size=5, columns=columns, open_answers=True)
    (tmp_path / "ood.jsonl").write_text('{"question": "a", "answer": "7"}\n{"question": "b", "answer": "900"}\n')
    extended = with_eval_answers(task, str(tmp_path / "ood.jsonl"), columns)
    assert extended.label_names == [*task.label_names, "900"]  # "7" is the task's own answer already
    assert extended.train == task.train  # the task's rows keep their ids
