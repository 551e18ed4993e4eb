"""Classification as generation, for decoders fine-tuned as causal language models.

Each row becomes a prompt (the template with the row's text) followed by the answer: the label word of its
class, preceded by a space, and the end-of-sequence token when the tokenizer has one (so a generating model
learns to stop). Training sequences are prompt + answer with label -100 on every prompt position, so only
the answer is learned (train.causal_lm_loss); they are padded on the left, so every answer ends at the
last position of its batch row.

Tokenization: the prompt is tokenized as one string, so its tokens are the ones the model would see in
running text, with the tokenizer's leading special token (BOS / [CLS]) kept and trailing ones ([SEP], EOS)
dropped, so the answer follows the prompt directly. A prompt too long for `max_length` loses tokens from
the end of its text (the longer text first, for pairs), never from the template, so the cue that asks for
the answer ("Label:") is always there; a `max_length` that leaves no token of a text beside the template and the
answer is refused, naming the least that does. Answer words are tokenized on their own (with the leading space),
once per class; the label words must tokenize to distinct token sequences.

The accuracy of such a model (evaluate.causal_accuracy) is measured on the same sequences: the answer is
stripped and either the label word with the highest likelihood is taken (default) or an answer is
generated and compared with the label words after normalization.
"""

from __future__ import annotations

import functools
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autopeft.data import TextSplit, TokenizedSplit
from autopeft.errors import DataError

DEFAULT_TEMPLATE = "Text: {text}\nLabel:"
DEFAULT_PAIR_TEMPLATE = "Text: {text}\nSecond text: {text_pair}\nLabel:"


@dataclass(frozen=True)
class CausalFormat:
    """How a class is put into words and tokens: the template, one label word per class (class id order)
    and the token ids of each answer (label word without the end-of-sequence token)."""

    template: str
    label_words: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    eos_id: int | None

    @classmethod
    def build(cls, tokenizer: Any, label_words: list[str] | tuple[str, ...], template: str, *,
              source: str = "--label-words") -> CausalFormat:
        """`source` names where the words came from in an error: --label-words, or the task's answer column."""
        check_template(template)
        # The answer comes after a space of its own: 'Label: ' trained on 'Label:  bad', two spaces.
        template = template.rstrip(" ")
        answers = tuple(tuple(tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"])
                        for word in label_words)
        problem = _answer_problem(list(label_words), answers)
        if problem:
            raise DataError(f"{source}: {problem}")
        return cls(template, tuple(w.strip() for w in label_words), answers, tokenizer.eos_token_id)

    def target(self, label: int) -> list[int]:
        """The tokens a training sequence ends with for class `label`."""
        return list(self.answer_ids[label]) + ([self.eos_id] if self.eos_id is not None else [])

    def label_of(self, answer: list[int]) -> int:
        """The class whose target is `answer` (a training sequence's labelled tokens)."""
        label = self._labels_by_target.get(tuple(answer))
        if label is None:
            raise ValueError(f"answer tokens {answer} match no label word of {self.label_words[:10]}")
        return label

    @functools.cached_property
    def _labels_by_target(self) -> dict[tuple[int, ...], int]:
        # open answers (question answering) can be thousands of classes: a lookup, not a scan per row
        return {tuple(self.target(label)): label for label in range(len(self.answer_ids))}


def check_template(template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone brace
        raise DataError(f"--template: {template!r} is not a valid template ({exc}); write a literal brace as "
                        "{{ or }}") from None
    if any(spec or conversion for _, name, spec, conversion in parsed if name is not None):
        raise DataError(f"--template: {template!r} may hold plain {{text}} and {{text_pair}} fields only, "
                        "without conversions or format specs")
    fields = template_fields(template)
    if "text" not in fields or not fields <= {"text", "text_pair"}:
        raise DataError(f"--template: {template!r} must contain {{text}} (and may contain {{text_pair}} for "
                        f"sentence pairs), no other fields; found: {', '.join(sorted(fields)) or 'none'}")
    repeated = sorted(name for name, uses in Counter(n for _, n, _, _ in parsed if n is not None).items() if uses > 1)
    if repeated:  # only one copy could be cut to fit --max-length: the other was kept whole, counted as template
        raise DataError(f"--template: {template!r} holds {{{repeated[0]}}} more than once; give each field once")


def template_fields(template: str) -> set[str]:
    """The fields a (valid) template fills: a literal '{{text_pair}}' is text, not a field."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _answer_problem(words: list[str], answers: tuple[tuple[int, ...], ...]) -> str | None:
    if any(not w.strip() for w in words):
        return f"{words} has an empty label word"
    if any(not a for a in answers):
        return f"{words}: a label word tokenizes to nothing"
    first: dict[tuple[int, ...], str] = {}
    for word, answer in zip(words, answers, strict=True):
        if answer in first:  # named, not listed: open answers can be thousands
            return f"{first[answer]!r} and {word!r} tokenize to the same tokens; choose words that differ"
        first[answer] = word
    return None


def default_label_words(label_names: list[str]) -> list[str]:
    """The label names themselves ("fresh", "rotten"); users with codes ("0", "1") should pass words."""
    return list(label_names)


def default_template(pairs: bool) -> str:
    return DEFAULT_PAIR_TEMPLATE if pairs else DEFAULT_TEMPLATE


def label_words_problem(label_words: list[str] | tuple[str, ...], label_names: list[str]) -> str | None:
    """Why these words cannot name the task's classes (checked before anything trains), or None."""
    if len(label_words) != len(label_names):
        return (f"--label-words: {len(label_words)} word{'s' * (len(label_words) != 1)} ({', '.join(label_words)}) for {len(label_names)} "
                f"classes ({', '.join(label_names)}); give one word per class, in that order")
    return None


def tokenize_causal(split: TextSplit, tokenizer: Any, max_length: int, label_words: list[str] | tuple[str, ...],
                    template: str = DEFAULT_TEMPLATE, *, source: str = "--label-words") -> TokenizedSplit:
    """Prompt + answer per row, labels -100 on the prompt, padded on the left. `source` names where the words
    came from in an error (as CausalFormat.build)."""
    fmt = CausalFormat.build(tokenizer, label_words, template, source=source)
    if len(fmt.label_words) <= max(split.labels):
        raise DataError(f"--label-words: {len(fmt.label_words)} words for {max(split.labels) + 1} classes; "
                        "give one word per class, in the order of the task's labels")
    if (split.pairs is not None) != ("text_pair" in template_fields(template)):
        raise DataError(f"--template: {template!r} must contain {{text_pair}} exactly when the task has a second "
                        f"text column ({'it has' if split.pairs is not None else 'it has none'})")
    # Every prompt keeps room for the longest answer, whatever its own: cut to fit its own answer, a prompt's
    # length told the model which answer follows (on coin-flip labels, 1.0 accuracy from truncated rows alone).
    longest = max(range(len(fmt.answer_ids)), key=lambda label: len(fmt.answer_ids[label]))
    room = len(fmt.target(longest))
    inputs, labels, worst = [], [], None
    for row, (text, label) in enumerate(zip(split.texts, split.labels, strict=True)):
        ids, owners = _prompt_tokens(tokenizer, fmt.template, text, split.pairs[row] if split.pairs else None)
        need = _least_prompt(owners) + room
        if need > max_length:  # refused below, named by the row that needs the most
            if worst is None or need > worst[0]:
                worst = (need, owners, fmt.target(longest), longest)
            continue
        prompt, answer = _truncated(ids, owners, max_length - room), fmt.target(label)
        inputs.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    if worst:
        _refuse_no_room(*worst, fmt, max_length, source)
    return TokenizedSplit(inputs, labels, pad_left=True)


def _refuse_no_room(need: int, owners: list[str | None], answer: list[int], label: int, fmt: CausalFormat,
                    max_length: int, source: str) -> None:
    """A --max-length the template and answer fill trained on prompts without text; one an answer alone
    exceeds was blamed on the template ("more than the -52 left")."""
    word = fmt.label_words[label]
    shown = word if len(word) <= 40 else word[:37] + "..."
    eos = " with end-of-sequence" if fmt.eos_id is not None else ""
    if len(answer) >= max_length:
        raise DataError(f"--max-length: {max_length} is too short for the answer {shown!r} ({source}): it takes "
                        f"{len(answer)} tokens{eos}, and its prompt at least {need - len(answer)}; use "
                        f"--max-length {need} or more")
    raise DataError(f"--max-length: {max_length} leaves no room for the text: the template {fmt.template!r} takes "
                    f"{owners.count(None)} tokens and the answer {shown!r} {len(answer)}{eos}; use "
                    f"--max-length {need} or more")


def causal_format(tokenizer: Any, label_words: list[str] | tuple[str, ...],
                  template: str = DEFAULT_TEMPLATE, *, source: str = "--label-words") -> CausalFormat:
    """The format tokenize_causal used: what evaluate.causal_accuracy needs to read its splits."""
    return CausalFormat.build(tokenizer, label_words, template, source=source)


def generated_answers_problem(label_words: list[str] | tuple[str, ...]) -> str | None:
    """Label words a generated answer cannot tell apart: generate mode compares answers normalized (case,
    punctuation and extra spaces dropped), so 'yes' and 'Yes.' would both be right whatever the model says."""
    from autopeft.evaluate import normalize_answer

    problem = unmatchable_answer_problem(label_words)
    if problem:
        return problem
    clash = _same_answer(label_words, [normalize_answer(word) for word in label_words])
    if clash is None:
        return None
    return (f"--label-words: {clash[0]!r} and {clash[1]!r} are the same answer once normalized (case, punctuation "
            "and spaces dropped), as --causal-eval generate compares them; choose words that differ")


def _same_answer(words: Sequence[str], answers: Sequence[str]) -> tuple[str, str, str] | None:
    """The first two words with the same answer, and that answer, or None."""
    first: dict[str, str] = {}
    for word, answer in zip(words, answers, strict=True):
        if answer in first:
            return first[answer], word, answer
        first[answer] = word
    return None


def decoded_answers_problem(fmt: CausalFormat, tokenizer: Any) -> str | None:
    """Label words that differ as written but not as their tokens decode (a WordPiece decode reads 'U.S.' as
    'u. s.', which normalizes as 'u s' does): generate mode compares decoded words, so one answer was right for
    both classes."""
    from autopeft.evaluate import label_word_answers

    clash = _same_answer(fmt.label_words, label_word_answers(fmt, tokenizer))
    if clash is None:
        return None
    return (f"--label-words: {clash[0]!r} and {clash[1]!r} are the same answer as this tokenizer decodes them "
            f"({clash[2]!r} once normalized), as --causal-eval generate compares them; choose words that differ")


def unmatchable_answer_problem(label_words: list[str] | tuple[str, ...], source: str = "--label-words") -> str | None:
    """A word generate mode can never find right: nothing is left of it once normalized ('?', '+'), and an empty
    answer matches no class, so its rows would score 0 whatever the model says."""
    from autopeft.evaluate import normalize_answer

    empty = next((word for word in label_words if not normalize_answer(word)), None)
    if empty is None:
        return None
    return (f"{source}: {empty!r} is nothing once normalized (case, punctuation and spaces dropped), as "
            "--causal-eval generate compares answers, so no answer could match it; choose words with a letter or "
            "digit" + (" (--label-words)" if source != "--label-words" else "") + ", or use --causal-eval rank")


def ranked_answers_problem(fmt: CausalFormat, source: str = "--label-words") -> str | None:
    """Label words rank mode cannot tell apart: it scores each word's tokens after the prompt, and a word whose
    tokens begin another's ('New' and 'New York') scores at least as high as it, so the longer word could
    never be predicted."""
    starts = {answer[:n]: k for k, answer in enumerate(fmt.answer_ids) for n in range(1, len(answer))}
    for k, answer in enumerate(fmt.answer_ids):
        if answer in starts:  # a lookup, not a scan of pairs: open answers can be thousands
            return (f"{source}: {fmt.label_words[k]!r} is how {fmt.label_words[starts[answer]]!r} begins once "
                    "tokenized, so --causal-eval rank could never answer the longer one; choose words whose "
                    "tokens do not begin another's, or use --causal-eval generate")
    return None


def _prompt_tokens(tokenizer: Any, template: str, text: str, pair: str | None) -> tuple[list[int], list[str | None]]:
    """The filled template's tokens (trailing special tokens dropped) and the field each comes from (None: the
    template or a special token)."""
    fields = {"text": text, "text_pair": pair or ""}
    rendered, spans = _render(template, fields)
    encoded = tokenizer(rendered, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    while ids and ids[-1] in special and len(ids) > 1:  # [SEP] / EOS would sit between prompt and answer
        ids.pop(), offsets.pop()
    return ids, [_owner(ids[i], offsets[i], spans, special) for i in range(len(ids))]


def _least_prompt(owners: list[str | None]) -> int:
    """The fewest tokens a prompt can be cut to: all of the template's and one of each text."""
    return owners.count(None) + len(set(owners) - {None})


def _truncated(ids: list[int], owners: list[str | None], budget: int) -> list[int]:
    """At most `budget` tokens (at least _least_prompt): the longest text loses its last token, then again."""
    ids, owners = list(ids), list(owners)
    for _ in range(len(ids) - budget):
        counts = Counter(owner for owner in owners if owner is not None)
        longest = max(counts, key=lambda name: counts[name])
        drop = max(i for i, owner in enumerate(owners) if owner == longest)
        del ids[drop], owners[drop]
    return ids


def strip_trailing_special(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` without the special tokens a tokenizer appends ([SEP], EOS), which would sit between a prompt
    and its answer; a leading BOS / [CLS] stays."""
    special = set(tokenizer.all_special_ids)
    ids = list(ids)
    while len(ids) > 1 and ids[-1] in special:
        ids.pop()
    return ids


def _render(template: str, fields: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """The filled template and the character span of each field's text in it."""
    out, spans = "", {}
    for literal, name, _, _ in string.Formatter().parse(template):
        out += literal
        if name is not None:
            spans[name] = (len(out), len(out) + len(fields[name]))
            out += fields[name]
    return out, spans


def _owner(token: int, offset: tuple[int, int], spans: dict[str, tuple[int, int]], special: set[int]) -> str | None:
    """The field whose text this token ends in (None: the template or a special token). A token that runs on past
    its text into the template ('."' after a quoted review) is the template's, so truncation never cuts the
    template; one that begins with the template's space before the text (' The') is the text's."""
    if token in special or offset[1] <= offset[0]:
        return None
    return next((name for name, (a, b) in spans.items() if a < offset[1] <= b), None)
