"""Forgetting probes: how much of the base model's general ability an adapted model keeps.

The encoder probe measures representation drift: the mean-pooled final hidden states of fixed general
texts (real Wikipedia paragraphs shipped with gensim's test data) from the adapted model are compared
with the base model's by linear CKA (Kornblith et al. 2019). forgetting = 1 - CKA, in [0, 1]; 0 means
the adapted encoder represents general text exactly as the base did (up to rotation and scale). It needs
no labels, is computed from one forward pass over a few dozen texts, and is independent of the task head,
so it compares methods fairly. The base representations are computed once per process.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopeft.data import TokenizedSplit, collate, eval_batches

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _strip_markup(text: str) -> str:
    text = re.sub(r"<!--.*?-->|<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    previous = None
    while previous != text:  # templates and links nest: resolve the innermost first
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\[\[(?:[^\[\]|]*\|)*([^\[\]|]*)\]\]", r"\1", text)  # [[target|label]] -> label
    text = re.sub(r"'{2,}|<[^>]+>", "", text)
    return html.unescape(text)


def wikipedia_paragraphs(min_chars: int = 200) -> list[str]:
    """Prose paragraphs of the real Wikipedia articles in gensim's test data, in file order."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise RuntimeError("the forgetting probe needs `pip install --no-deps gensim==4.4.0` (for its test data)")
    path = Path(spec.origin).parent / "test" / "test_data" / WIKI_FILE
    paragraphs = []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for _, element in ET.iterparse(handle):
            if element.tag.endswith("}text") and element.text:
                for line in _strip_markup(element.text).splitlines():
                    line = line.strip()
                    leftover_markup = any(mark in line for mark in ("[[", "]]", "{{", "}}"))
                    if len(line) >= min_chars and not leftover_markup and not line.startswith(("|", "!", "{", "*", "#", ":", "=")):
                        paragraphs.append(line)
            element.clear()
    return paragraphs


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment of two (n, d) representation matrices; 1 = same up to rotation/scale."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


class RepresentationDrift:
    """forgetting = 1 - linear CKA between base and adapted sentence representations of general text."""

    name = "representation_drift"

    def __init__(self, tokenizer: Any, *, n_texts: int = 96, max_length: int = 96, seed: int = 0) -> None:
        texts = random.Random(seed).sample(wikipedia_paragraphs(), n_texts)
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.texts = texts
        self.split = TokenizedSplit(list(ids), torch.zeros(len(ids), dtype=torch.long),
                                    pad_left=tokenizer.padding_side == "left")
        self.pad_id = tokenizer.pad_token_id
        self.base: torch.Tensor | None = None

    @torch.inference_mode()
    def representations(self, model: nn.Module, device: torch.device | None = None) -> torch.Tensor:
        """Mean over non-pad positions of the last hidden layer, one row per probe text."""
        model.eval()
        order, pooled_batches = [], []
        for rows in eval_batches(self.split.lengths(), 32):
            batch = collate(self.split, rows, self.pad_id)
            mask = batch["attention_mask"].to(device or "cpu")
            out = model(input_ids=batch["input_ids"].to(mask.device), attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1][:, -mask.shape[1]:]  # drop virtual tokens a method may prepend
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            order += rows
            pooled_batches.append(pooled.float().cpu())
        return torch.cat(pooled_batches)[torch.tensor(order).argsort()]  # back to the texts' order

    def fit_base(self, base_model: nn.Module, device: torch.device | None = None) -> None:
        self.base = self.representations(base_model, device)

    def forgetting(self, model: nn.Module, device: torch.device | None = None) -> float:
        if self.base is None:
            raise RuntimeError("call fit_base(base_model) once before scoring adapted models")
        return max(0.0, 1.0 - linear_cka(self.base, self.representations(model, device)))
