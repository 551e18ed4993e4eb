"""The PEFT method registry. One module per method in this package; each calls `register` once.

Adding a method means adding one file here: every module in this package is imported below, so its
`register(...)` call runs, and the search-space validator and `autopeft methods` see it at once.
A method module imports peft inside the functions that build the adapter, not at the top: importing peft
takes about 4 s here, and commands that never build one (export's checks, report, methods, estimate, bad
input) should answer without it.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

ParamKind = Literal["int", "float", "bool", "choice"]


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter a method accepts: its type, the values it allows, its default and meaning."""

    kind: ParamKind
    default: Any
    help: str
    low: float | None = None  # inclusive bounds a value must respect (int/float)
    high: float | None = None
    choices: tuple[Any, ...] = ()  # allowed values (choice)

    def allowed(self) -> str:
        """The values a space may give, in a few words (`autopeft methods` lists them)."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return " | ".join(map(str, self.choices))
        number = (lambda v: str(int(v))) if self.kind == "int" else (lambda v: f"{v:g}")
        bounds = [f">= {number(self.low)}" if self.low is not None else "",
                  f"<= {number(self.high)}" if self.high is not None else ""]
        return f"{'integer' if self.kind == 'int' else 'number'} {', '.join(b for b in bounds if b)}".strip()

    def shown_default(self) -> str:
        """The default as a YAML space would write it."""
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    def check(self, value: Any) -> str | None:
        """Why `value` is not allowed, or None when it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "choice":
            return None if value in self.choices else f"must be one of {', '.join(map(str, self.choices))}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a{'n integer' if self.kind == 'int' else ' number'}"
        if not math.isfinite(value):  # nan passes every comparison below, and some ranges have no upper bound
            return "must be a finite number"
        if self.kind == "int" and not float(value).is_integer():
            return "must be an integer"
        if self.low is not None and value < self.low:
            return f"must be >= {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}"
        return None


@dataclass(frozen=True)
class MethodContext:
    """What a method may need besides its own parameters to attach itself."""

    task_type: str = "SEQ_CLS"  # peft task type: SEQ_CLS (classification head) or CAUSAL_LM
    max_steps: int = 150  # optimizer steps the trial will take (AdaLoRA's rank schedule needs it)


ApplyFn = Callable[[nn.Module, dict[str, Any], MethodContext], nn.Module]


@dataclass(frozen=True)
class Method:
    """A PEFT method: `apply(model, params, context)` returns the model with the adapter in place and only
    the adapter (and a classification head) trainable.

    peft-backed methods save and load with peft. Our own methods inject modules into the transformers model
    itself; `autopeft.adapter_io` saves their trainable tensors and reloads them by applying the method
    again to a fresh base. `supports(model)` says why the method cannot apply to an architecture (None when
    it can); `after_step(model, step)` runs after each optimizer step, before gradients are cleared
    (AdaLoRA's rank allocation); `merge(model)` folds the update into the base weights."""

    name: str
    summary: str
    params: dict[str, ParamSpec]
    apply: ApplyFn
    peft_backed: bool  # saves with peft's save_pretrained / loads with PeftModel.from_pretrained
    can_merge: bool  # the trained update folds into the base weights (no inference overhead)
    families: tuple[str, ...] = ("bert", "llama", "gpt2")  # architectures it supports
    notes: str = field(default="")
    supports: Callable[[nn.Module], str | None] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    merge: Callable[[nn.Module], nn.Module] | None = None
    # Why no draw of a search space can work, given (lowest, highest) of each parameter in it (None when
    # some can); a combination only some draws break is left to fail its trial.
    space_problem: Callable[[Callable[[str], tuple[float, float]]], str | None] | None = None
    # Positions the method adds to every input (prompt tuning's virtual tokens): a model with a position
    # table (BERT, GPT-2) must hold them on top of the longest row.
    added_positions: Callable[[dict[str, Any]], int] | None = None

    def problem(self, model: nn.Module) -> str | None:
        """Why this method cannot apply to `model`, or None when it can."""
        from autopeft.models import family

        fam = family(model)
        if fam not in self.families:
            return f"{self.name} does not support {fam} models (supports: {', '.join(self.families)})"
        return self.supports(model) if self.supports else None

    def resolve(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """The full parameter set of a trial: defaults, overridden by what was sampled."""
        return {name: sampled.get(name, spec.default) for name, spec in self.params.items()}


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"PEFT method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown PEFT method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_all()
