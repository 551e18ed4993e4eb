"""Probes: how much of the base model's general ability an adapted model keeps (forgetting), and how well
what it learned carries beyond its training rows (generalization). Each probe is a small class with one
job and the same interface: `fit_base(base_model)` once (the base's reference scores), then
`score(model) -> {metric: value}` per trial. A forgetting probe names the metric that is its forgetting
(`forgetting_key`); it is exactly 0 for the base model itself and grows as the adapted model drifts.

Forgetting probes:
- linear_probe (any model; the encoder default): the fraction of the base model's linear-probe accuracy
  the adapted model loses, floored at 0. The probe reads which of 16 Wikipedia articles a paragraph comes
  from (8 paragraphs each, seeded) off the mean-pooled final hidden states, with a logistic regression
  refitted on each model's own features (seeded 5-fold cross-validation). Decision: it is the encoder
  objective rather than representation drift because it asks whether the general information is still
  there, not whether the features moved: learning a task has to move them, so under drift the least
  forgetting on a Pareto front is always the configuration that learned nothing (the default LoRA
  recipe at the majority class measures 1 - CKA 0.0002), while a rotation that keeps everything
  readable costs nothing here. It is not at the ceiling on MiniLM (base 0.83), so losses show.
- representation_drift (any model): 1 - linear CKA (Kornblith et al. 2019) between
  the base's and the adapted model's mean-pooled final hidden states of fixed general texts (real
  Wikipedia paragraphs shipped with gensim's test data, a seeded sample). In [0, 1]; needs no labels and
  is independent of the task head, so it compares methods fairly.
- perplexity (decoders): the relative increase of the perplexity of general text (the same Wikipedia
  paragraphs), adapted / base - 1, floored at 0 (the signed change is logged as well). Works on causal
  LMs and on decoder classifiers with tied embeddings (their input embedding is the LM head).
- factual_recall (decoders): capital -> country pairs from gensim's questions-words.txt
  (": capital-common-countries"). A pair is recalled when the right country is the most likely
  continuation of "<capital> is the capital of" among all the section's countries. retention =
  adapted / base recall; forgetting = 1 - retention, floored at 0 (retention 1 when the base recalls
  nothing). Top-1 rather than likelihood, so the score is what a user asking the model would see; the
  mean probability of the right country among the candidates is logged too (recall_probability).

Generalization probes (not forgetting):
- generalization_gap: accuracy on (a seeded sample of) the training rows minus validation accuracy.
- ood_accuracy: accuracy on an out-of-distribution evaluation set (--ood-task), and its change over the base.

ProbeSet runs the chosen probes, reports their metrics plus `forgetting` (the first forgetting probe's
value: the search objective), and caches the base model's reference state in a file, so a study
computes it once. Decision: one probe is the objective rather than a blend of scales that do not
compare (a relative perplexity increase is unbounded, recall retention moves in steps of 1/23). For
decoders the default objective is the perplexity increase: continuous and about all general text;
factual recall is logged beside it, and a user who cares more about facts lists it first.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import importlib.util
import math
import os
import pickle
import random
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from autopeft.data import TextSplit, TokenizedSplit, collate, eval_batches, model_inputs, tokenize
from autopeft.errors import ConfigError, first_line
from autopeft.evaluate import choice_log_likelihoods, lm_logits
from autopeft.verbalizer import strip_trailing_special

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
QUESTIONS_FILE = "questions-words.txt"
Evaluate = Callable[[nn.Module, TokenizedSplit, "torch.device | None"], float]


def _gensim_test_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise RuntimeError("the forgetting probes need `pip install --no-deps gensim==4.4.0` (for its test data)")
    return Path(spec.origin).parent / "test" / "test_data" / name


def _strip_markup(text: str) -> str:
    text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    previous = None
    while previous != text:  # templates and links nest: resolve the innermost first
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\[\[(?:[^\[\]|]*\|)*([^\[\]|]*)\]\]", r"\1", text)  # [[target|label]] -> label
    text = re.sub(r"'{2,}|<[^>]+>", "", text)
    return html.unescape(text)


def wikipedia_paragraphs(min_chars: int = 200) -> list[str]:
    """Prose paragraphs of the real Wikipedia articles in gensim's test data, in file order."""
    return [paragraph for article in _wikipedia_articles(min_chars) for paragraph in article]


def wikipedia_articles(min_chars: int = 200) -> list[list[str]]:
    """The same paragraphs grouped by article (articles without prose are left out), in file order."""
    return [list(article) for article in _wikipedia_articles(min_chars) if article]


@functools.lru_cache(maxsize=4)
def _wikipedia_articles(min_chars: int) -> tuple[tuple[str, ...], ...]:  # parsing takes seconds: once
    articles = []
    with bz2.open(_gensim_test_file(WIKI_FILE), "rt", encoding="utf-8") as handle:
        for _, element in ET.iterparse(handle):
            if element.tag.endswith("}text") and element.text:
                articles.append(tuple(line for line in map(str.strip, _strip_markup(element.text).splitlines())
                                      if _is_prose(line, min_chars)))
            element.clear()
    return tuple(articles)


def _is_prose(line: str, min_chars: int) -> bool:
    leftover_markup = any(mark in line for mark in ("[[", "]]", "{{", "}}"))
    return len(line) >= min_chars and not leftover_markup and not line.startswith(("|", "!", "{", "*", "#", ":", "="))


def capital_country_pairs() -> list[tuple[str, str]]:
    """The distinct (capital, country) pairs of questions-words.txt's ': capital-common-countries' section
    (each analogy line holds two pairs), in file order."""
    pairs: list[tuple[str, str]] = []
    section = False
    for line in _gensim_test_file(QUESTIONS_FILE).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line.strip() == ": capital-common-countries"
            continue
        words = line.split()
        if section and len(words) == 4:
            for pair in ((words[0], words[1]), (words[2], words[3])):
                if pair not in pairs:
                    pairs.append(pair)
    return pairs


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment of two (n, d) representation matrices; 1 = same up to rotation/scale."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


class Probe(Protocol):
    name: str
    forgetting_key: str | None  # the metric of score() that is this probe's forgetting; None: not a forgetting probe

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None: ...

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]: ...

    def base_state(self) -> dict[str, Any]: ...

    def load_base_state(self, state: dict[str, Any]) -> None: ...


def _require(value: Any, probe: str) -> Any:
    if value is None:
        raise RuntimeError(f"{probe}: call fit_base(base_model) once before scoring adapted models")
    return value


def _sample_texts(n_texts: int, seed: int) -> list[str]:
    paragraphs = wikipedia_paragraphs()
    return random.Random(seed).sample(paragraphs, min(n_texts, len(paragraphs)))


@torch.inference_mode()
def pooled_representations(model: nn.Module, split: TokenizedSplit, pad_id: int,
                           device: torch.device | None = None) -> torch.Tensor:
    """Mean over non-pad positions of the last hidden layer, one row per text of `split`, in its order."""
    model.eval()
    order, pooled_batches = [], []
    for rows in eval_batches(split.lengths(), 32):
        batch = collate(split, rows, pad_id)
        mask = batch["attention_mask"].to(device or "cpu")
        # with its positions: a left-padded text's features would otherwise move with its batch's padding
        # (GPT-2's absolute positions), and an unchanged model would read as drifted
        out = model(**model_inputs(batch, mask.device), output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -mask.shape[1]:]  # drop virtual tokens a method may prepend
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        order += rows
        pooled_batches.append(pooled.float().cpu())
    return torch.cat(pooled_batches)[torch.tensor(order).argsort()]  # back to the texts' order


class RepresentationDrift:
    """forgetting = 1 - linear CKA between base and adapted sentence representations of general text."""

    name = "representation_drift"
    forgetting_key = "representation_drift"
    own_length = True  # its texts are cut at its own max_length, whatever --max-length says

    def __init__(self, tokenizer: Any, *, n_texts: int = 96, max_length: int = 96, seed: int = 0) -> None:
        self.texts = _sample_texts(n_texts, seed)
        self.split = tokenize(TextSplit(self.texts, [0] * len(self.texts)), tokenizer, max_length)
        self.pad_id = tokenizer.pad_token_id
        self.base: torch.Tensor | None = None

    def representations(self, model: nn.Module, device: torch.device | None = None) -> torch.Tensor:
        return pooled_representations(model, self.split, self.pad_id, device)

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        self.base = self.representations(base_model, device)

    def forgetting(self, model: nn.Module, device: torch.device | None = None) -> float:
        base = _require(self.base, self.name)
        return floored(1.0 - linear_cka(base, self.representations(model, device)))

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        return {self.forgetting_key: self.forgetting(model, device)}

    def base_state(self) -> dict[str, Any]:
        return {"representations": _require(self.base, self.name)}

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.base = state["representations"]


class LinearProbe:
    """forgetting = the fraction of the base model's linear-probe accuracy lost: which Wikipedia article a
    paragraph comes from, read off the mean-pooled final hidden states by a logistic regression refitted on
    each model's own features (seeded 5-fold cross-validation over fixed paragraphs). The accuracy is the
    fraction of all paragraphs predicted right when held out, so forgetting moves in whole paragraphs (the
    mean of the folds' accuracies would weigh a paragraph of a 16-row fold twice one of a 32-row fold, and
    read a different split of the same paragraphs as a loss)."""

    name = "linear_probe"
    forgetting_key = "linear_probe_forgetting"
    own_length = True  # its paragraphs are cut at its own max_length, whatever --max-length says

    def __init__(self, tokenizer: Any, *, n_articles: int = 16, per_article: int = 8, max_length: int = 48,
                 seed: int = 0) -> None:
        rng = random.Random(seed)
        articles = rng.sample([a for a in wikipedia_articles() if len(a) >= per_article], n_articles)
        rows = [(paragraph, label) for label, article in enumerate(articles)
                for paragraph in rng.sample(article, per_article)]
        self.texts, self.labels = [text for text, _ in rows], [label for _, label in rows]
        self.split = tokenize(TextSplit(self.texts, self.labels), tokenizer, max_length)
        self.pad_id = tokenizer.pad_token_id
        self.seed = seed
        self.base: float | None = None

    def accuracy(self, model: nn.Module, device: torch.device | None = None) -> float:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        features = pooled_representations(model, self.split, self.pad_id, device).numpy()
        folds = StratifiedKFold(5, shuffle=True, random_state=self.seed)
        # Standardised per feature: the probe sees the information, not the features' scale or offset (mean
        # pooling puts every text near one common vector, and a model may shrink or grow its features).
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted = cross_val_predict(probe, features, self.labels, cv=folds)
        return float((predicted == np.asarray(self.labels)).mean())

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        self.base = self.accuracy(base_model, device)

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        base = _require(self.base, self.name)
        accuracy = self.accuracy(model, device)
        # Floored at 0: a probe that reads the articles better than the base's is no forgetting (the accuracy
        # itself is logged); the search should not chase probe noise upwards.
        lost = floored((base - accuracy) / base) if base > 0 else 0.0
        return {"linear_probe_accuracy": accuracy, self.forgetting_key: lost}

    def base_state(self) -> dict[str, Any]:
        return {"accuracy": _require(self.base, self.name)}

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.base = state["accuracy"]


def scores_through_tied_head(base_model: nn.Module, probe: str) -> bool:
    """False when the model's own logits are next-token logits (a causal LM); True for a decoder classifier
    with tied embeddings, whose input embedding is the LM head its blocks were trained with."""
    from autopeft.models import family

    if family(base_model) == "bert":
        raise ConfigError([(f"--probes: {probe} scores next tokens, which an encoder (BERT layout) does not "
                           "predict; use representation_drift")])
    if base_model.get_output_embeddings() is not None:
        return False
    if getattr(base_model.config, "tie_word_embeddings", False):
        return True
    raise ConfigError([(f"--probes: {probe} needs the LM head, which this classifier lacks (its output "
                       "embedding is not tied to the input embedding); use the causal-LM task type or "
                       "representation_drift")])


def tied_head(model: nn.Module, tied: bool) -> torch.Tensor | None:
    """The output embedding to score a classifier's hidden states with: the model's own (tied) input
    embedding, so a method that trains the embeddings is scored with what it trained."""
    return model.get_input_embeddings().weight if tied else None


def floored(value: float) -> float:
    """max(0, value), with NaN kept: max(0.0, nan) is 0.0, which scored a model whose outputs are not finite as
    one that forgot nothing (the trial completed, and exported, instead of failing as non-finite)."""
    return value if math.isnan(value) else max(0.0, value)


class PerplexityIncrease:
    """forgetting = perplexity of general text under the adapted model / under the base - 1 (floored at 0)."""

    name = "perplexity"
    forgetting_key = "perplexity_increase"

    def __init__(self, tokenizer: Any, *, n_texts: int = 32, max_length: int = 128, seed: int = 0,
                 batch_size: int = 8) -> None:
        self.texts = _sample_texts(n_texts, seed)
        ids = [list(i) for i in tokenizer(self.texts, truncation=True, max_length=max_length)["input_ids"]]
        self.split = TokenizedSplit(ids, ids, pad_left=True)
        self.pad_id, self.batch_size = tokenizer.pad_token_id, batch_size
        self.base: float | None = None
        self.tied = False

    @torch.inference_mode()
    def perplexity(self, model: nn.Module, device: torch.device | None = None) -> float:
        """exp(mean next-token loss) over every non-pad token of the probe texts but each text's first."""
        model.eval()
        device = device or torch.device("cpu")
        weight = tied_head(model, self.tied)
        total, count = 0.0, 0
        for rows in eval_batches(self.split.lengths(), self.batch_size):
            batch = {k: v.to(device) for k, v in collate(self.split, rows, self.pad_id).items()}
            width = batch["input_ids"].shape[1]
            logits = lm_logits(model, batch["input_ids"], batch["attention_mask"], keep=width, output_weight=weight)
            # A left-padded row's first token would be scored from a pad position's output (rows that share a
            # batch with longer ones); masked, the score no longer depends on how rows are batched.
            targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
        return float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        self.tied = scores_through_tied_head(base_model, self.name)
        self.base = self.perplexity(base_model, device)

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        base = _require(self.base, self.name)
        value = self.perplexity(model, device)
        change = value / base - 1.0
        return {"perplexity": value, "perplexity_change": change, self.forgetting_key: floored(change)}

    def base_state(self) -> dict[str, Any]:
        return {"perplexity": _require(self.base, self.name), "tied": self.tied}

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.base, self.tied = state["perplexity"], state["tied"]


class FactualRecall:
    """forgetting = 1 - (capital -> country recall of the adapted model) / (recall of the base)."""

    name = "factual_recall"
    forgetting_key = "recall_forgetting"
    own_length = True  # its prompts are as long as they are, whatever --max-length says
    PROMPT = "{capital} is the capital of"

    def __init__(self, tokenizer: Any, *, pairs: Sequence[tuple[str, str]] | None = None,
                 batch_size: int = 64) -> None:
        self.pairs = list(pairs) if pairs is not None else capital_country_pairs()
        self.countries = list(dict.fromkeys(country for _, country in self.pairs))
        self.prompts = [strip_trailing_special(tokenizer, tokenizer(self.PROMPT.format(capital=c))["input_ids"])
                        for c, _ in self.pairs]
        self.choices = [list(tokenizer(" " + c, add_special_tokens=False)["input_ids"]) for c in self.countries]
        self.gold = torch.tensor([self.countries.index(country) for _, country in self.pairs])
        # The most tokens the model sees at once: a prompt, with a country after it unless every country is one
        # token (then one pass scores them all at the prompt's last position; evaluate.choice_log_likelihoods).
        longest_choice = max(map(len, self.choices), default=0)
        self.longest_tokens = max(map(len, self.prompts), default=0) + (longest_choice if longest_choice > 1 else 0)
        self.pad_id, self.batch_size = tokenizer.pad_token_id, batch_size
        self.base: float | None = None
        self.tied = False

    def recall(self, model: nn.Module, device: torch.device | None = None) -> tuple[float, float]:
        """(fraction of pairs whose country ranks first, mean probability of the right country when the
        probabilities are renormalised over the candidates)."""
        scores = choice_log_likelihoods(model, self.prompts, self.choices, pad_id=self.pad_id,
                                        batch_size=self.batch_size, device=device,
                                        output_weight=tied_head(model, self.tied))
        if not torch.isfinite(scores).all():  # argmax would pick the first candidate: a recall out of nothing
            return float("nan"), float("nan")
        top = float((scores.argmax(1) == self.gold).float().mean())
        soft = float(scores.softmax(1).gather(1, self.gold[:, None]).mean())
        return top, soft

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        self.tied = scores_through_tied_head(base_model, self.name)
        self.base = self.recall(base_model, device)[0]

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        base = _require(self.base, self.name)
        top, soft = self.recall(model, device)
        retention = top / base if base > 0 else 1.0  # a base that recalls nothing has nothing to lose
        return {"recall_accuracy": top, "recall_probability": soft, "recall_retention": retention,
                self.forgetting_key: floored(1.0 - retention)}

    def base_state(self) -> dict[str, Any]:
        return {"recall": _require(self.base, self.name), "tied": self.tied}

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.base, self.tied = state["recall"], state["tied"]




def _longest_input(probe: Probe) -> int:
    """Tokens in the longest row the probe feeds the model (its texts, or the task's splits it evaluates)."""
    splits = [v for v in vars(probe).values() if isinstance(v, TokenizedSplit) and len(v)]
    unsplit = getattr(probe, "longest_tokens", 0)  # a probe whose inputs are not a split
    return max([max(split.lengths()) for split in splits] + [unsplit])


def _scored_tokens(probes: Sequence[Probe]) -> str:
    """A digest of every token sequence the probes score (their texts, prompts and answers, as tokenized)."""
    digest = hashlib.sha256()
    for probe in probes:
        for name in ("split", "train", "validation", "ood", "prompts", "choices"):
            held = getattr(probe, name, None)
            digest.update(f"{probe.name}.{name}:{getattr(held, 'input_ids', held)!r}".encode())
    return digest.hexdigest()[:16]


class ProbeCacheWarning(UserWarning):
    """The cached base scores could not be read, and are computed again."""


def _read_cache(cache_file: Path) -> dict[str, Any]:
    """The cached base state, or {} (computed again, and the file replaced) when it cannot be read: an empty or
    damaged file ended every later search of the study in a traceback. Read as plain tensors and numbers, never
    as code (weights_only)."""
    try:
        cached = torch.load(cache_file, weights_only=True)
    except (EOFError, OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:  # truncated, junk, not ours
        warnings.warn(ProbeCacheWarning(f"{cache_file}: unreadable ({first_line(exc, 120)}); the base model's "
                                        "probe scores are computed again"), stacklevel=3)
        return {}
    return cached if isinstance(cached, dict) else {}


class GeneralizationGap:
    """Accuracy on training rows minus validation accuracy: how much of the fit does not carry over."""

    name = "generalization_gap"
    forgetting_key = None

    def __init__(self, evaluate: Evaluate, train: TokenizedSplit, validation: TokenizedSplit, *,
                 max_rows: int = 1000, seed: int = 0) -> None:
        rows = sorted(random.Random(seed).sample(range(len(train)), min(max_rows, len(train))))
        self.evaluate, self.train, self.validation = evaluate, train.subset(rows), validation

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        """Nothing to remember: the gap compares a model with itself."""

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        train = self.evaluate(model, self.train, device)
        known = (measured or {}).get("val_accuracy")  # the trial measured it already: no second pass
        validation = known if known is not None else self.evaluate(model, self.validation, device)
        return {"train_accuracy": train, "generalization_gap": train - validation}

    def base_state(self) -> dict[str, Any]:
        return {}

    def load_base_state(self, state: dict[str, Any]) -> None:
        pass


class OutOfDistribution:
    """Accuracy on an out-of-distribution evaluation set, and its change over the base model."""

    name = "ood_accuracy"
    forgetting_key = None

    def __init__(self, evaluate: Evaluate, ood: TokenizedSplit) -> None:
        self.evaluate, self.ood = evaluate, ood
        self.base: float | None = None

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        self.base = self.evaluate(base_model, self.ood, device)

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        value = self.evaluate(model, self.ood, device)
        return {"ood_accuracy": value, "ood_accuracy_change": value - _require(self.base, self.name)}

    def base_state(self) -> dict[str, Any]:
        return {"accuracy": _require(self.base, self.name)}

    def load_base_state(self, state: dict[str, Any]) -> None:
        self.base = state["accuracy"]


@dataclass(frozen=True)
class ProbeContext:
    """What the probes of a study may need; build_probes takes what each chosen probe uses."""

    tokenizer: Any
    seed: int = 0
    evaluate: Evaluate | None = None  # accuracy of a model on a split, as the task measures it
    train: TokenizedSplit | None = None
    validation: TokenizedSplit | None = None
    ood: TokenizedSplit | None = None
    max_length: int = 128


def _drift(c: ProbeContext) -> Probe:
    return RepresentationDrift(c.tokenizer, seed=c.seed)


def _linear(c: ProbeContext) -> Probe:
    return LinearProbe(c.tokenizer, seed=c.seed)


def _perplexity(c: ProbeContext) -> Probe:
    return PerplexityIncrease(c.tokenizer, seed=c.seed, max_length=c.max_length)


def _recall(c: ProbeContext) -> Probe:
    return FactualRecall(c.tokenizer)


def _gap(c: ProbeContext) -> Probe:
    assert c.evaluate is not None and c.train is not None and c.validation is not None
    return GeneralizationGap(c.evaluate, c.train, c.validation, seed=c.seed)


def _ood(c: ProbeContext) -> Probe:
    assert c.evaluate is not None and c.ood is not None
    return OutOfDistribution(c.evaluate, c.ood)


# name -> (factory, needs a decoder, needs --ood-task, is a forgetting probe)
PROBES: dict[str, tuple[Callable[[ProbeContext], Probe], bool, bool, bool]] = {
    "linear_probe": (_linear, False, False, True),
    "representation_drift": (_drift, False, False, True),
    "perplexity": (_perplexity, True, False, True),
    "factual_recall": (_recall, True, False, True),
    "generalization_gap": (_gap, False, False, False),
    "ood_accuracy": (_ood, False, True, False),
}


def default_probes(*, decoder: bool, has_ood: bool) -> tuple[str, ...]:
    """Encoders: the linear probe. Decoders: perplexity increase (the objective) and factual recall.
    Both: the train-validation gap, and OOD accuracy when an OOD set is given."""
    forgetting = ("perplexity", "factual_recall") if decoder else ("linear_probe",)
    return forgetting + ("generalization_gap",) + (("ood_accuracy",) if has_ood else ())


def probe_problems(names: Sequence[str], *, decoder: bool | None, has_ood: bool) -> list[str]:
    """Every reason this probe set cannot run; `decoder` None (the model not loaded yet) leaves out the checks
    that need to know whether it is a decoder."""
    unknown = [n for n in names if n not in PROBES]
    problems = [f"--probes: unknown probe {n!r}; known: {', '.join(PROBES)}" for n in unknown]
    if len(set(names)) < len(names):
        problems.append(f"--probes: {', '.join(names)} names a probe twice")
    for name in (n for n in names if n in PROBES):
        _, needs_decoder, needs_ood, _ = PROBES[name]
        if needs_decoder and decoder is False:
            problems.append(f"--probes: {name} needs a decoder (it scores next tokens); this model is an encoder")
        if needs_ood and not has_ood:
            problems.append(f"--probes: {name} needs an evaluation set; pass --ood-task")
    if not unknown and not any(PROBES[n][3] for n in names):  # else the unknown name is what is wrong
        forgetting = ", ".join(n for n, spec in PROBES.items() if spec[3])
        problems.append(f"--probes: choose at least one forgetting probe ({forgetting}): the search minimises "
                        "forgetting")
    return problems


def build_probes(names: Sequence[str], context: ProbeContext) -> ProbeSet:
    return ProbeSet([PROBES[name][0](context) for name in names])


class ProbeSet:
    """The chosen probes, run together. `forgetting` in the scores is the first forgetting probe's value."""

    def __init__(self, probes: list[Probe]) -> None:
        primary = next((p for p in probes if p.forgetting_key is not None), None)
        if primary is None:
            raise ConfigError(["--probes: choose at least one forgetting probe"])
        self.probes, self.primary = probes, primary
        self.base_scores: dict[str, float] | None = None
        self._loaded_key: str | None = None  # the cache entry fit_base loaded (None: it fitted the base itself)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.probes]

    def longest_input(self, *, own_length_only: bool = False) -> int:
        """Tokens in the longest row a probe feeds the model (its texts, or the task's splits it evaluates);
        `own_length_only`: of the probes whose texts keep their length whatever --max-length says."""
        return max((_longest_input(p) for p in self.probes if getattr(p, "own_length", False) or not own_length_only),
                   default=0)

    def too_long(self, positions: int) -> dict[str, int]:
        """The probes whose own-length texts need more than `positions` (--max-length cannot shorten them), with
        how many tokens each needs."""
        own = {p.name: _longest_input(p) for p in self.probes if getattr(p, "own_length", False)}
        return {name: tokens for name, tokens in own.items() if tokens > positions}

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None, *,
                 cache_file: Path | None = None, cache_key: str = "") -> dict[str, float]:
        """Fit every probe on the base model and score the base itself (forgetting 0), or load both from
        `cache_file` when `save_base` wrote it for the same `cache_key` (which must identify the model, seed
        and data) and probe names. Returns the base model's scores."""
        key = self._cache_entry(cache_key)
        if cache_file is not None and cache_file.is_file():
            cached = _read_cache(cache_file)
            if cached.get("key") == key:
                for probe, state in zip(self.probes, cached["states"], strict=True):
                    probe.load_base_state(state)
                self.base_scores, self._loaded_key = cached["base_scores"], key
                return dict(self.base_scores)
        for probe in self.probes:
            probe.fit_base(base_model, device)
        self.base_scores = self.score(base_model, device)
        return dict(self.base_scores)

    def _cache_entry(self, cache_key: str) -> str:
        """What a cached base state must match: the model, seed and data (`cache_key`), these probes and the tokens
        they score (the texts ship in packages: a base scored on another release's texts read as forgetting)."""
        return f"{cache_key}|{','.join(self.names)}|tokens {_scored_tokens(self.probes)}"

    def save_base(self, cache_file: Path, cache_key: str = "") -> None:
        """Keep the fitted base state for the next process of this study (written only once the study
        exists, so a refused command writes nothing). A cache of another key is replaced: kept, it made every
        later process of a study started again with --force-new (new label words, say) fit the base again."""
        key = self._cache_entry(cache_key)
        if self.base_scores is None or self._loaded_key == key:
            return
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        states = [p.base_state() for p in self.probes]
        partial = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")  # a worker never reads half a file
        torch.save({"key": key, "states": states, "base_scores": self.base_scores}, partial)
        os.replace(partial, cache_file)

    def score(self, model: nn.Module, device: torch.device | None = None,
              measured: Mapping[str, float] | None = None) -> dict[str, float]:
        scores: dict[str, float] = {}
        for probe in self.probes:
            scores.update(probe.score(model, device, measured))
        scores["forgetting"] = scores[self.primary.forgetting_key]  # type: ignore[index]
        return scores
