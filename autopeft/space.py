"""Search-space YAML -> SearchSpace; `suggest(trial)` -> TrialParams (method parameters only for that method).

A dimension is written one of three ways:
    r: 8                                  # fixed
    r: [4, 8, 16]                         # categorical
    learning_rate: {low: 1.0e-4, high: 5.0e-3, log: true}   # range (int when the parameter is an int)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from autopeft import methods
from autopeft.errors import ConfigError, first_line
from autopeft.methods import ParamSpec
from autopeft.train import OPTIMIZERS, PRECISIONS, SCHEDULERS

TRAINING_PARAMS: dict[str, ParamSpec] = {
    "learning_rate": ParamSpec("float", 1e-3, "peak learning rate", low=1e-8, high=10.0),
    "optimizer": ParamSpec("choice", "adamw", "optimizer", choices=OPTIMIZERS),
    "precision": ParamSpec("choice", "fp32", "compute precision (fp16 uses dynamic loss scaling)", choices=PRECISIONS),
    "grad_accum_steps": ParamSpec("int", 1, "micro-batches per optimizer step", low=1, high=4096),
    "micro_batch_size": ParamSpec("int", 16, "rows per forward/backward pass", low=1, high=65536),
    "weight_decay": ParamSpec("float", 0.0, "weight decay (decoupled for adamw, adamw_8bit and adafactor; L2 on the gradient for sgd, "
                                          "as torch's SGD applies it); not on biases, norm weights, (IA)^3 vectors or "
                                          "DoRA magnitudes", low=0.0, high=1.0),
    "warmup_ratio": ParamSpec("float", 0.0, "fraction of steps with a linear warm-up", low=0.0, high=0.9),
    "scheduler": ParamSpec("choice", "linear", "learning-rate decay after warm-up", choices=SCHEDULERS),
    "max_grad_norm": ParamSpec("float", 1.0, "gradient clipping norm (0 disables clipping)", low=0.0, high=1e6),
    "momentum": ParamSpec("float", 0.9, "momentum of sgd", low=0.0, high=0.999),
    "gradient_checkpointing": ParamSpec("bool", False, "recompute activations in backward to save memory"),
    "effective_batch_size": ParamSpec("int", 0, "if set (0: not set), fixes micro_batch_size x grad_accum_steps and the "
                                      "search picks only the split (grad_accum_steps is derived)", low=0, high=1 << 20),
}
_TOP_KEYS = ("method", "training", "methods")
_RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) parameter, named as Optuna records it."""

    name: str
    kind: str  # fixed | categorical | int | float
    value: Any = None
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    @property
    def numeric(self) -> bool:
        """Whether every value it can take is a number (a range, or choices of numbers; not flags)."""
        values = self.choices if self.kind == "categorical" else (self.value,) if self.kind == "fixed" else (self.low,)
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    def bounds(self) -> tuple[Any, Any]:
        """The lowest and highest value a draw can take (numeric dimensions)."""
        if self.kind == "fixed":
            return self.value, self.value
        if self.kind == "categorical":
            return min(self.choices), max(self.choices)
        return self.low, self.high

    def holds(self, value: Any) -> bool:
        """Whether a draw can give `value`: one of the choices, or in the range and on its step (an int range
        steps by 1)."""
        if self.kind in ("fixed", "categorical"):
            return value in ((self.value,) if self.kind == "fixed" else self.choices)
        step = self.step or (1 if self.kind == "int" else None)
        steps = (value - self.low) / step if step else 0.0
        return self.low <= value <= self.high and abs(steps - round(steps)) < 1e-9

    def grid_count(self) -> int:
        """How many values grid_values lists (counted without listing them)."""
        return round((self.high - self.low) / (self.step or 1)) + 1

    def grid_values(self) -> list[Any]:
        """Every value of a stepped range, from low: a float range's by float arithmetic rounded to 12 significant
        digits, so 0.3 + 6 x 0.1 is 0.9, not 0.9000000000000001 (above high, refused by a recipe), and a whole
        step on a fractional low (0.5, step 1) keeps the fraction."""
        step, count = self.step or 1, self.grid_count()
        if self.kind == "int":
            return [int(self.low) + i * int(step) for i in range(count)]
        return [min(float(f"{self.low + i * step:.12g}"), self.high) for i in range(count)]

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


@dataclass(frozen=True)
class TrialParams:
    """Everything a trial builds and trains with; `flat()` is exactly what the trial records."""

    method: str
    method_params: dict[str, Any]
    training: dict[str, Any]

    def flat(self) -> dict[str, Any]:
        return {"method": self.method, **{f"{self.method}.{k}": v for k, v in self.method_params.items()},
                **self.training}

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrialParams:
        method = flat["method"]
        prefix = f"{method}."
        return cls(method, {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)},
                   {k: v for k, v in flat.items() if k in TRAINING_PARAMS})


def _training_values(chosen: dict[str, Any]) -> dict[str, Any]:
    """Every training setting: the chosen ones over the defaults; a fixed effective batch sets the accumulation
    (only its split into micro-batches is chosen)."""
    training = {**{k: spec.default for k, spec in TRAINING_PARAMS.items()}, **chosen}
    if training["effective_batch_size"]:
        training["grad_accum_steps"] = training["effective_batch_size"] // training["micro_batch_size"]
    return training


@dataclass(frozen=True)
class SearchSpace:
    path: str
    method: Dimension
    method_dims: dict[str, dict[str, Dimension]]
    training_dims: dict[str, Dimension]
    training_overrides: dict[str, dict[str, Dimension]]  # per method, e.g. a higher learning rate for ia3
    fingerprint: str  # hash of the parsed file: a resumed study must use the same space

    def suggest(self, trial: optuna.Trial) -> TrialParams:
        method = self.method.suggest(trial)
        sampled = {name: dim.suggest(trial) for name, dim in self.method_dims[method].items()}
        training = _training_values({name: dim.suggest(trial) for name, dim in self.training_dims_of(method).items()})
        return TrialParams(method, methods.get(method).resolve(sampled), training)

    def fixed_params(self, method: str) -> TrialParams:
        """`method` with the values this space fixes and every searched parameter at its default: what
        `autopeft estimate --space` estimates (the defaults once replaced fixed values too)."""
        def fixed(dims: dict[str, Dimension]) -> dict[str, Any]:
            return {name: dim.value for name, dim in dims.items() if dim.kind == "fixed"}

        training = _training_values(fixed(self.training_dims_of(method)))
        return TrialParams(method, methods.get(method).resolve(fixed(self.method_dims.get(method, {}))), training)

    def lightest_method_params(self, method: str) -> dict[str, Any]:
        """`method`'s parameters at their lightest in this space: the values it fixes, each searched number at
        its lowest (a smaller rank or bottleneck, fewer virtual tokens, no dropout never cost more memory), and
        other searched values (target sets, flags) at their defaults: which of those is lightest depends on the
        model, so the search's budget check measures them."""
        chosen = {}
        for name, dim in self.method_dims.get(method, {}).items():
            if dim.kind == "fixed" or dim.numeric:
                chosen[name] = dim.bounds()[0]
        return methods.get(method).resolve(chosen)

    def training_dims_of(self, method: str) -> dict[str, Dimension]:
        """The training dimensions a trial of `method` draws: the shared ones, with the method's overrides."""
        return {**self.training_dims, **self.training_overrides.get(method, {})}

    def grid(self) -> dict[str, list[Any]]:
        """Every searched dimension's values, for Optuna's GridSampler (ranges need a step)."""
        dims = [self.method, *self.training_dims.values()]
        dims += [d for group in (*self.method_dims.values(), *self.training_overrides.values()) for d in group.values()]
        grid: dict[str, list[Any]] = {}
        for dim in dims:
            if dim.kind == "categorical":
                grid[dim.name] = list(dim.choices)
            elif dim.kind in ("int", "float"):
                if dim.step is None and dim.kind == "float" or dim.log:
                    raise ConfigError([(f"--sampler grid: {self.path}: {dim.name} is a continuous range; give it a "
                                       "list of values (or a step, without log) to search it on a grid")])
                if dim.grid_count() > GRID_LIMIT:  # listed, its values alone could fill the memory
                    raise ConfigError([(f"--sampler grid: {self.path}: {dim.name} has {dim.grid_count():,} values on "
                                       f"its grid, more than the {GRID_LIMIT:,} points a grid may have; take a larger "
                                       "step, or use another sampler")])
                grid[dim.name] = dim.grid_values()
        points = math.prod(len(values) for values in grid.values())
        if points > GRID_LIMIT:
            widest = ", ".join(f"{name} {len(values)}" for name, values in
                               sorted(grid.items(), key=lambda item: -len(item[1]))[:4])
            raise ConfigError([(f"--sampler grid: {self.path}: the grid, the product of every method's settings, has "
                               f"{points:,} points (the most values: {widest}), more than {GRID_LIMIT:,}; take larger "
                               "steps or fewer values, search one method at a time, or use another sampler")])
        return grid

    def method_names(self) -> list[str]:
        return list(self.method.choices) if self.method.kind == "categorical" else [self.method.value]


# Optuna's GridSampler lists the product of every method's settings in every process (about 150 bytes a point):
# two million points take about 300 MB, and no search trains that many.
GRID_LIMIT = 2_000_000


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it as the number it obviously is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _parse_range(raw: dict, name: str, spec: ParamSpec, where: str, problems: list[str]) -> Dimension | None:
    unknown = set(raw) - _RANGE_KEYS
    if unknown:
        problems.append(f"{where}: unknown range key(s) {', '.join(sorted(map(str, unknown)))}; allowed: low, high, log, step")
        return None
    if spec.kind not in ("int", "float"):
        problems.append(f"{where}: a range needs a numeric parameter; use a list of choices for {spec.kind} values")
        return None
    if "low" not in raw or "high" not in raw:
        problems.append(f"{where}: a range needs both low and high")
        return None
    low, high, step = _number(raw["low"]), _number(raw["high"]), _number(raw.get("step"))
    before = len(problems)
    for key, value in (("low", low), ("high", high)):
        why = spec.check(value)
        if why:
            problems.append(f"{where}.{key}: {value!r} {why}")
    if len(problems) > before:
        return None
    log = raw.get("log", False)
    if not isinstance(log, bool):  # bool("false") is True: a quoted "false" would search on a log scale
        problems.append(f"{where}.log: {log!r} must be true or false (unquoted)")
    if low > high:
        problems.append(f"{where}: low {low!r} is greater than high {high!r}")
    if log is True and low <= 0:
        problems.append(f"{where}.low: {low!r} must be > 0 on a log scale")
    problems += _step_problems(step, low, high, log is True, spec.kind, where)
    if len(problems) > before:
        return None
    return Dimension(name, spec.kind, low=low, high=high, log=log, step=step)


def _step_problems(step: Any, low: Any, high: Any, log: bool, kind: str, where: str) -> list[str]:
    """Optuna would round a fractional int step down and cut a high off the grid, each with only a warning."""
    if step is None:
        return []
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or log:
        return [f"{where}.step: {step!r} must be a positive number and cannot be combined with log"]
    if kind == "int" and step != int(step):
        return [f"{where}.step: {step!r} must be a whole number for an integer parameter"]
    if abs((high - low) / step - round((high - low) / step)) > 1e-9:
        return [(f"{where}.high: {high!r} is not on the grid low + k x step ({low!r} + k x {step!r}); "
                 f"use a high of {low + int((high - low) // step) * step!r}")]
    return []


def parse_dimension(raw: Any, name: str, spec: ParamSpec, where: str, problems: list[str]) -> Dimension | None:
    if isinstance(raw, dict):
        return _parse_range(raw, name, spec, where, problems)
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        problems.append(f"{where}: an empty list of choices; give at least one value")
        return None
    values = [_number(v) if spec.kind in ("int", "float") else v for v in values]
    bad = [(v, spec.check(v)) for v in values if spec.check(v)]
    for value, why in bad:
        problems.append(f"{where}: {value!r} {why}")
    if bad:
        return None
    values = [int(v) if spec.kind == "int" else v for v in values]
    if len(set(values)) < len(values):  # one configuration drawn twice as often; a grid walks it again and again
        problems.append(f"{where}: {raw!r} lists a choice more than once; list each once")
        return None
    if isinstance(raw, list) and len(values) > 1:
        return Dimension(name, "categorical", choices=tuple(values))
    return Dimension(name, "fixed", value=values[0])


def _parse_params(raw: Any, specs: dict[str, ParamSpec], prefix: str, where: str,
                  problems: list[str], also_allowed: str = "") -> dict[str, Dimension]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping of parameter names to values, lists or ranges")
        return {}
    dims = {}
    for key, value in raw.items():
        if key not in specs:
            problems.append(f"{where}.{key}: unknown parameter; allowed: {', '.join(specs)}{also_allowed}")
            continue
        dim = parse_dimension(value, f"{prefix}{key}", specs[key], f"{where}.{key}", problems)
        if dim is not None:
            dims[key] = dim
    return dims


def _check_effective_batch(training: dict[str, Dimension], where: str, problems: list[str]) -> None:
    """A fixed effective batch must be split exactly by every micro-batch size the space can choose."""
    effective = training.get("effective_batch_size")
    if effective is None:
        return
    if effective.kind != "fixed":
        problems.append(f"{where}.effective_batch_size: must be one fixed number (it is what stays constant)")
        return
    if "grad_accum_steps" in training:
        problems.append(f"{where}.grad_accum_steps: leave it out when effective_batch_size is set (it is derived)")
    micro = training.get("micro_batch_size")
    sizes = [16] if micro is None else (list(micro.choices) if micro.kind == "categorical" else
                                        [micro.value] if micro.kind == "fixed" else None)
    if sizes is None:
        problems.append(f"{where}.micro_batch_size: give a list of sizes when effective_batch_size is set")
    elif any(effective.value % size for size in sizes):
        problems.append(f"{where}.effective_batch_size: {effective.value} is not divisible by every "
                        f"micro_batch_size in {sizes}")


def _check_method_combinations(names: list[str], method_dims: dict[str, dict[str, Dimension]], path: str) -> None:
    """Refuse a method the space draws whose parameters, as the space allows them, break its rules on every draw."""
    problems = []
    for name in names:
        method, dims = methods.get(name), method_dims[name]
        if method.space_problem is None:
            continue
        def bounds(param: str, dims: dict[str, Dimension] = dims, method: methods.Method = method) -> tuple[Any, Any]:
            dim = dims.get(param)
            return dim.bounds() if dim else (method.params[param].default,) * 2
        problem = method.space_problem(bounds)
        if problem:
            problems.append(f"{path}: methods.{name}: {problem}")
    if problems:
        raise ConfigError(problems)


def _split_method_section(raw: Any, own_specs: dict[str, ParamSpec]) -> tuple[Any, dict[str, Any]]:
    """A method's section holds its own parameters and, optionally, training parameters that override the
    shared ones for this method only (methods differ in the learning rates they need)."""
    if not isinstance(raw, dict):
        return raw, {}
    shared = {k: v for k, v in raw.items() if k in TRAINING_PARAMS and k not in own_specs}
    return {k: v for k, v in raw.items() if k not in shared}, shared


def parse_space(data: Any, path: str) -> SearchSpace:
    """Validate a loaded YAML document; every problem is collected into one ConfigError."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: must be a YAML mapping with keys {', '.join(_TOP_KEYS)}"])
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(f"{path}: {key}: unknown key; allowed: {', '.join(_TOP_KEYS)}")
    method_spec = ParamSpec("choice", None, "PEFT method", choices=tuple(methods.names()))
    method = None
    if "method" not in data:
        problems.append(f"{path}: method: missing; give one method or a list, from: {', '.join(methods.names())}")
    else:
        method = parse_dimension(data["method"], "method", method_spec, f"{path}: method", problems)
    per_method = data.get("methods") or {}
    method_dims: dict[str, dict[str, Dimension]] = {}
    overrides: dict[str, dict[str, Dimension]] = {}
    if not isinstance(per_method, dict):
        problems.append(f"{path}: methods: must map method names to their parameters")
        per_method = {}
    for name, raw in per_method.items():
        if name not in methods.names():
            problems.append(f"{path}: methods.{name}: unknown method; known: {', '.join(methods.names())}")
            continue
        own, shared = _split_method_section(raw, methods.get(name).params)
        method_dims[name] = _parse_params(own, methods.get(name).params, f"{name}.", f"{path}: methods.{name}",
                                          problems, f"; or a training parameter for this method: {', '.join(TRAINING_PARAMS)}")
        overrides[name] = _parse_params(shared, TRAINING_PARAMS, f"{name}.", f"{path}: methods.{name}", problems)
    training = _parse_params(data.get("training"), TRAINING_PARAMS, "", f"{path}: training", problems)
    _check_effective_batch(training, f"{path}: training", problems)
    for name, own in overrides.items():  # a method's own batch settings, with the shared ones they override
        if own.keys() & {"effective_batch_size", "micro_batch_size", "grad_accum_steps"}:
            shared = {k: v for k, v in training.items() if not ("effective_batch_size" in own and k == "grad_accum_steps")}
            _check_effective_batch({**shared, **own}, f"{path}: methods.{name}", problems)
    if problems or method is None:
        raise ConfigError(problems)
    drawn = list(method.choices if method.kind == "categorical" else (method.value,))
    for name in drawn:
        method_dims.setdefault(name, {})
    _check_method_combinations(drawn, method_dims, path)
    canonical = json.dumps(data, sort_keys=True, default=str)
    return SearchSpace(path, method, method_dims, training, overrides, hashlib.sha256(canonical.encode()).hexdigest()[:16])


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error. YAML forbids it, but
    PyYAML keeps the last value silently: a second `r:` under `lora:` would quietly replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (lines {seen[key]} and {line}); keep one",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml_file(path: Path) -> Any:
    """A YAML file a person writes (a space, a recipe), safe-loaded and refused when a key repeats."""
    return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader subclass: safe


def load_space(path: str | Path) -> SearchSpace:
    """Read a search-space file with a safe loader and validate it (no model or data is touched)."""
    path = Path(path)
    try:
        data = load_yaml_file(path)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such search-space file"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {yaml_problem(exc)}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text (a search space is a YAML file)"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: a folder; a search space is a YAML file"]) from None
    return parse_space(data, str(path))


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what (PyYAML's own message quotes the text over several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {getattr(exc, 'problem', None) or first_line(exc)}"
