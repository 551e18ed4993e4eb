"""Task metrics: accuracy of a classification head, and of a causal LM that answers with label words.

Causal-LM accuracy (classification as generation, see verbalizer.py) has two modes:
- "rank" (default): the predicted class is the label word with the highest log-likelihood after the
  prompt (the sum over the word's tokens). It always names a valid class, so it compares with a
  classification head and with the majority-class rate, and it measures what the model prefers even
  before it has learned the answer format. This is what the search optimises.
- "generate": greedy decoding of at most the longest answer's tokens (plus end-of-sequence); correct when
  the decoded text equals the row's label word after normalization (case folded, punctuation dropped, spaces
  collapsed). Stricter: a model that has not learned to answer in words scores 0. The "label words" may be
  open answers, one per distinct answer of a question-answering task (data.load_task's `open_answers`).

Language-model scores also work on a classifier built from a decoder (a sequence-classification head on
the same blocks): the output embedding (tied to the input embedding in SmolLM2, the Llama-style tiny
models and GPT-2) applied to the final hidden states gives the next-token logits the LM head would.
Rows are scored padded on the left with positions counted from each row's first real token.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from autopeft.data import TokenizedSplit, collate, eval_batches, left_padded_positions, model_inputs
from autopeft.verbalizer import CausalFormat

CausalMode = Literal["rank", "generate"]
CAUSAL_MODES: tuple[str, ...] = ("rank", "generate")


@torch.inference_mode()
def class_probabilities(model: nn.Module, split: TokenizedSplit, *, pad_id: int, batch_size: int = 128,
                        device: torch.device | None = None) -> torch.Tensor:
    """The classification head's probabilities, a row per example in the split's order."""
    device = device or torch.device("cpu")
    model.eval()
    probabilities: torch.Tensor | None = None
    for rows in eval_batches(split.lengths(), batch_size):
        batch = collate(split, rows, pad_id)
        logits = model(**model_inputs(batch, device)).logits
        if probabilities is None:
            probabilities = torch.empty(len(split), logits.shape[-1])
        probabilities[rows] = logits.float().softmax(-1).cpu()
    return probabilities if probabilities is not None else torch.empty(0, 0)


def predict(model: nn.Module, split: TokenizedSplit, *, pad_id: int, batch_size: int = 128,
            device: torch.device | None = None) -> torch.Tensor:
    """Predicted class per row, in the split's order."""
    return class_probabilities(model, split, pad_id=pad_id, batch_size=batch_size, device=device).argmax(-1)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, keep: int,
              output_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits at the last `keep` positions, (batch, keep, vocab). `output_weight`: the output
    embedding to apply to the final hidden states when `model` has a classification head instead.

    Rows are padded on the left, so positions are counted from each row's first real token: a model with
    absolute position embeddings (GPT-2) then scores a row the same whatever the padding."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": left_padded_positions(attention_mask)}
    if output_weight is not None:
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -keep:]
        return hidden.to(output_weight.dtype) @ output_weight.T
    try:  # only the positions needed: full-vocabulary logits of every position are large
        out = model(**inputs, logits_to_keep=keep)
    except TypeError:  # a model whose forward does not take it
        out = model(**inputs)
    return out.logits[:, -keep:]


def _batched_log_probs(model: nn.Module, sequences: list[list[int]], keep: int, *, pad_id: int, batch_size: int,
                       device: torch.device | None, output_weight: torch.Tensor | None):
    """(rows, log-softmax of the last `keep` positions) per length-sorted, left-padded batch."""
    device = device or torch.device("cpu")
    split = TokenizedSplit(sequences, torch.zeros(len(sequences), dtype=torch.long), pad_left=True)
    weight = output_weight.to(device) if output_weight is not None else None
    for rows in eval_batches(split.lengths(), batch_size):
        batch = collate(split, rows, pad_id)
        logits = lm_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), keep=keep,
                           output_weight=weight)
        yield rows, logits.float().log_softmax(-1).cpu()


@torch.inference_mode()
def choice_log_likelihoods(model: nn.Module, prompts: list[list[int]], choices: list[list[int]] | tuple, *,
                           pad_id: int, batch_size: int = 64, device: torch.device | None = None,
                           output_weight: torch.Tensor | None = None) -> torch.Tensor:
    """log p(choice | prompt), summed over the choice's tokens: (prompts, choices)."""
    model.eval()
    scores = torch.empty(len(prompts), len(choices))
    if all(len(c) == 1 for c in choices):  # one pass: every choice is one next token
        ids = torch.tensor([c[0] for c in choices])
        for rows, log_probs in _batched_log_probs(model, prompts, 1, pad_id=pad_id, batch_size=batch_size,
                                                  device=device, output_weight=output_weight):
            scores[rows] = log_probs[:, -1, ids]
        return scores
    for k, choice in enumerate(choices):  # the choice's tokens are the last positions of every row
        target = torch.tensor(choice)
        for rows, log_probs in _batched_log_probs(model, [p + list(choice) for p in prompts], len(choice) + 1,
                                                  pad_id=pad_id, batch_size=batch_size, device=device,
                                                  output_weight=output_weight):
            picked = log_probs[:, :-1].gather(-1, target.expand(len(rows), -1).unsqueeze(-1))
            scores[rows, k] = picked.squeeze(-1).sum(-1)
    return scores


def split_prompts(split: TokenizedSplit, fmt: CausalFormat) -> tuple[list[list[int]], list[int]]:
    """The prompts of a causal split (its rows without the answer) and each row's class."""
    prompts, golds = [], []
    for ids, labels in zip(split.input_ids, split.labels, strict=True):
        start = next(i for i, label in enumerate(labels) if label != -100)
        prompts.append(list(ids[:start]))
        golds.append(fmt.label_of(list(labels[start:])))
    return prompts, golds


# Punctuation, but for a sign or a decimal point before a digit: it changes a number ('-1' is not '1', '1.5' is
# not '15') where a full stop or an apostrophe does not change a word.
_DROPPED = re.compile(rf"(?![-.]\d)[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Case folded, punctuation dropped (a sign or decimal point before a digit kept), whitespace collapsed:
    'Positive.' == 'positive', '42.' == '42', '-1' != '1'."""
    return " ".join(_DROPPED.sub("", text.casefold()).split())


@torch.inference_mode()
def generate_greedy(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int,
                    eos_id: int | None, batch_size: int = 64, device: torch.device | None = None) -> list[list[int]]:
    """Greedy continuations, up to the end-of-sequence token or `max_new_tokens`. A plain loop of full
    forward passes (no cache): answers are a few tokens long, and it works for any adapter method."""
    model.eval()
    device = device or torch.device("cpu")
    out: list[list[int]] = [[] for _ in prompts]
    for rows in eval_batches([len(p) for p in prompts], batch_size):
        batch = collate(TokenizedSplit([prompts[i] for i in rows], torch.zeros(len(rows)), pad_left=True),
                        list(range(len(rows))), pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            token = lm_logits(model, ids, mask, keep=1)[:, -1].argmax(-1)
            for r, i in enumerate(rows):
                if not done[r]:
                    out[i].append(int(token[r]))
            done |= token == (eos_id if eos_id is not None else -1)
            if bool(done.all()):
                break
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return out


def predict_causal(model: nn.Module, split: TokenizedSplit, fmt: CausalFormat, *, pad_id: int,
                   mode: CausalMode = "rank", tokenizer: Any = None, batch_size: int = 64,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class per row, true class per row). In generate mode a row whose answer matches no
    label word is predicted as -1."""
    prompts, golds = split_prompts(split, fmt)
    if mode == "rank":
        scores = choice_log_likelihoods(model, prompts, fmt.answer_ids, pad_id=pad_id, batch_size=batch_size,
                                        device=device)
        return scores.argmax(1), torch.tensor(golds)
    if mode != "generate" or tokenizer is None:
        raise ValueError(f"mode {mode!r}: use 'rank', or 'generate' with the tokenizer to decode answers")
    answers = generate_greedy(model, prompts, max_new_tokens=generation_cap(fmt), pad_id=pad_id, eos_id=fmt.eos_id,
                              batch_size=batch_size, device=device)
    normalized = label_word_answers(fmt, tokenizer)
    words: dict[str, int] = {}
    for k, word in enumerate(normalized):
        words.setdefault(word, k)
    texts = [normalize_answer(tokenizer.decode(a, skip_special_tokens=True)) for a in answers]
    # Open answers may differ only where normalization drops it ("Paris" and "paris."): matching the row's
    # own answer counts as right whichever of them the lookup would name. An answer with nothing left once
    # normalized (none, or "?") names no class: a label word of punctuation alone would otherwise match silence.
    predicted = [-1 if not text else gold if text == normalized[gold] else words.get(text, -1)
                 for text, gold in zip(texts, golds, strict=True)]
    return torch.tensor(predicted), torch.tensor(golds)


def label_word_answers(fmt: CausalFormat, tokenizer: Any) -> list[str]:
    """What a generated answer is compared with: each label word as its own tokens decode, normalized (a WordPiece
    decode spaces punctuation: "U.S." reads "u. s."), so an answer of exactly those tokens matches. A word of
    unknown tokens decodes to nothing: compared as written, or an empty answer would match it."""
    return [normalize_answer(tokenizer.decode(ids, skip_special_tokens=True)) or normalize_answer(word)
            for ids, word in zip(fmt.answer_ids, fmt.label_words, strict=True)]


def causal_accuracy(model: nn.Module, split: TokenizedSplit, fmt: CausalFormat, *, pad_id: int,
                    mode: CausalMode = "rank", tokenizer: Any = None, batch_size: int = 64,
                    device: torch.device | None = None) -> float:
    evaluator = Evaluator(pad_id, batch_size, causal=fmt, mode=mode, tokenizer=tokenizer)
    return evaluator(model, split, device)


def generation_cap(fmt: CausalFormat) -> int:
    """The new tokens a generated answer may have: the longest answer's, plus end-of-sequence. A user who
    generates longer without an end-of-sequence token (a tokenizer lacking one) reads past the answer."""
    return max(len(a) for a in fmt.answer_ids) + (fmt.eos_id is not None)


@dataclass(frozen=True)
class Evaluator:
    """Accuracy on a tokenized split, measured the same way by every caller (trial, probes, export):
    a classification head's argmax, or (with `causal`) the label-word answer of a causal LM."""

    pad_id: int
    batch_size: int = 128
    causal: CausalFormat | None = None
    mode: CausalMode = "rank"
    tokenizer: Any = None  # generate mode decodes answers with it

    def __call__(self, model: nn.Module, split: TokenizedSplit, device: torch.device | None = None) -> float:
        return float(self.hits(model, split, device).float().mean())

    def hits(self, model: nn.Module, split: TokenizedSplit, device: torch.device | None = None) -> torch.Tensor:
        """Whether each row is answered right, in the split's order: what a paired comparison of two models
        on the same rows needs, and what accuracy averages."""
        if self.causal is None:
            predicted = predict(model, split, pad_id=self.pad_id, batch_size=self.batch_size, device=device)
            return predicted == split.labels
        predicted, gold = predict_causal(model, split, self.causal, pad_id=self.pad_id, mode=self.mode,
                                         tokenizer=self.tokenizer, batch_size=self.batch_size, device=device)
        return predicted == gold

    def progress(self, model: nn.Module, split: TokenizedSplit,
                 device: torch.device | None = None) -> tuple[float, float]:
        """(accuracy, the score a pruner compares) in mid-training. For a classification head the score is
        `class_separation`, not accuracy: early in a run most configurations still predict the majority
        class, so their accuracies tie, while the head may already rank the rows well. Measured on 30
        MiniLM trials of 240 steps: at step 30 separation ranks the trials by their final accuracy with a
        Spearman correlation of 0.73, accuracy (ties broken by confidence) 0.43
        (experiments/search/early_signal.md). Causal LMs, and a slice with one class: accuracy."""
        if self.causal is not None:
            accuracy = self(model, split, device)
            return accuracy, accuracy
        probabilities = class_probabilities(model, split, pad_id=self.pad_id, batch_size=self.batch_size,
                                            device=device)
        labels = split.labels.long()
        accuracy = float((probabilities.argmax(-1) == labels).float().mean())
        separation = class_separation(probabilities, labels)
        return accuracy, accuracy if separation is None else separation


def class_separation(probabilities: torch.Tensor, labels: torch.Tensor) -> float | None:
    """How well a head ranks each class's rows above the other rows, whatever its decision threshold: the
    one-vs-rest ROC AUC, averaged over the classes present (0.5 is chance, 1 perfect). None with one class."""
    from sklearn.metrics import roc_auc_score  # imported here, as elsewhere: keeps the CLI's start fast

    present = labels.unique().tolist()
    if len(present) < 2:
        return None
    truth = labels.cpu().numpy()
    scores = probabilities.float().cpu().numpy()
    return float(sum(roc_auc_score(truth == c, scores[:, c]) for c in present) / len(present))
