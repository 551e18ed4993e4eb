"""training.yaml: one trial's configuration as a file a person can read and `autopeft train` can rerun."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from autopeft import methods
from autopeft.config import LOCAL_PATH_KEYS, SearchConfig, absolute_if_local
from autopeft.errors import ConfigError, DataError, ModelError
from autopeft.space import TRAINING_PARAMS, TrialParams, load_yaml_file, yaml_problem

_DATA_KEYS = ("model", "task", "train_size", "val_size", "test_size", "max_length")
# How the task's rows become training examples and scores; optional when read (recipes written before them
# were all classification on the default columns and probes).
_TASK_KEYS = ("text_column", "label_column", "text_pair_column", "task_type", "label_words", "template", "causal_eval",
              "ood_task", "ood_text_column", "ood_label_column", "ood_text_pair_column", "probes")


def to_recipe(config: SearchConfig, params: TrialParams, seed: int,
              split_fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything needed to reproduce one trial: model, data split, method and training settings, seeds; and
    the fingerprints of the split it was trained and scored on, so a retrain can tell when the data changed."""
    return {
        **{key: _recorded(config, key) for key in (*_DATA_KEYS, *_TASK_KEYS)},
        "split_seed": config.seed,  # also seeds the classification head, which every trial shares
        "method": params.method, "method_params": params.method_params,
        **params.training, "max_steps": config.max_steps, "seed": seed,
        **({"split_fingerprints": split_fingerprints} if split_fingerprints else {}),
    }


def _recorded(config: SearchConfig, key: str) -> Any:
    """A config value as the recipe holds it: a local model or data path absolute (`autopeft train` may run from
    another folder), a tuple as a list (YAML's safe dumper has no tuples)."""
    value = getattr(config, key)
    if key in LOCAL_PATH_KEYS:
        return absolute_if_local(value)
    return list(value) if isinstance(value, tuple) else value


def write_recipe(path: Path, config: SearchConfig, params: TrialParams, seed: int,
                 split_fingerprints: dict[str, str] | None = None) -> None:
    path.write_text(yaml.safe_dump(to_recipe(config, params, seed, split_fingerprints), sort_keys=False))


def split_changes(path: Path, now: dict[str, str]) -> list[str]:
    """The splits whose rows differ from those the recipe's trial was trained and scored on (none when the
    recipe records no fingerprints: written before they were)."""
    recorded = load_yaml_file(path).get("split_fingerprints") or {}
    return [name for name, fingerprint in recorded.items() if now.get(name) != fingerprint]


_REQUIRED = (*_DATA_KEYS, "split_seed", "method", "method_params", "max_steps", "seed")
_ALLOWED = (*_REQUIRED, *_TASK_KEYS, *TRAINING_PARAMS, "split_fingerprints")
_INTEGERS = {"train_size": 1, "val_size": 1, "test_size": 1, "max_length": 1, "max_steps": 1, "split_seed": 0, "seed": 0}
# What each text value may be, as `autopeft export` writes it: a value of another kind failed deep in training.
_TEXTS = ("model", "task", "text_column", "label_column", "task_type", "causal_eval")
_OPTIONAL_TEXTS = ("text_pair_column", "template", "ood_task", "ood_text_column", "ood_label_column",
                   "ood_text_pair_column")
_OPTIONAL_LISTS = ("label_words", "probes")


def _problems(path: Path, data: dict[str, Any]) -> list[str]:
    """Every key the recipe may not hold and every value of the wrong kind: a typo in a key must not train on
    a default without a word."""
    problems = [f"{path}: {k}: unknown key; allowed: {', '.join(_ALLOWED)}" for k in data if k not in _ALLOWED]
    problems += [f"{path}: {k}: {data[k]!r} must be an integer of at least {low}" for k, low in _INTEGERS.items()
                 if isinstance(data[k], bool) or not isinstance(data[k], int) or data[k] < low]
    # The split seed is --seed's (below 2**32); a trial's training seed is it plus the trial number (torch's limit).
    problems += [f"{path}: {k}: {data[k]} must be below 2**{bits} (a seed)" for k, bits in (("split_seed", 32), ("seed", 64))
                 if isinstance(data[k], int) and data[k] >= 2**bits]
    problems += _kind_problems(path, data)
    problems += [f"{path}: {k}: {data[k]!r} {why}" for k, spec in TRAINING_PARAMS.items()
                 if k in data and (why := spec.check(data[k]))]
    fingerprints = data.get("split_fingerprints", {})
    if not isinstance(fingerprints, dict) or not all(isinstance(v, str) for v in fingerprints.values()):
        problems.append(f"{path}: split_fingerprints: must map split names to fingerprints, as `autopeft export` "
                        "writes them")
    problems += _batch_problems(path, data) if not problems else []
    if data["method"] not in methods.names():
        return [*problems, f"{path}: method: {data['method']!r} must be one of {', '.join(methods.names())}"]
    specs = methods.get(data["method"]).params
    if not isinstance(data["method_params"], dict):
        return [*problems, f"{path}: method_params: must map {data['method']}'s parameters to values"]
    for k, v in data["method_params"].items():
        if k not in specs:
            problems.append(f"{path}: method_params.{k}: unknown parameter of {data['method']}; allowed: {', '.join(specs)}")
        elif why := specs[k].check(v):
            problems.append(f"{path}: method_params.{k}: {v!r} {why}")
    return problems or _combination_problems(path, data)


def _combination_problems(path: Path, data: dict[str, Any]) -> list[str]:
    """Values each allowed but not together (AdaLoRA's target_r above its init_r): the method's own rule for a
    space, applied to the recipe's one point, so the run is refused before anything trains or is logged."""
    method = methods.get(data["method"])
    if method.space_problem is None:
        return []
    values = method.resolve(data["method_params"])
    why = method.space_problem(lambda name: (values[name], values[name]))
    return [f"{path}: method_params: {why}"] if why else []


def _kind_problems(path: Path, data: dict[str, Any]) -> list[str]:
    """The text and list values of the wrong kind (`model: 5`, `probes: linear_probe`), each named by its key."""
    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    problems = [f"{path}: {k}: {data[k]!r} must be a text" for k in _TEXTS if k in data and not text(data[k])]
    problems += [f"{path}: {k}: {data[k]!r} must be a text, or null" for k in _OPTIONAL_TEXTS
                 if data.get(k) is not None and not text(data[k])]
    # An empty list read as null: the defaults ran (the default probes, the label names as words) without a word.
    return problems + [f"{path}: {k}: {data[k]!r} must be a list of one or more texts, or null" for k in _OPTIONAL_LISTS
                       if data.get(k) is not None and not (isinstance(data[k], list) and data[k] and all(map(text, data[k])))]


def _batch_problems(path: Path, data: dict[str, Any]) -> list[str]:
    """A recipe states the batch as micro_batch_size x grad_accum_steps; an effective_batch_size that disagrees
    was read and ignored (the run trained on another batch than the one the file names)."""
    effective = data.get("effective_batch_size", 0)
    micro = data.get("micro_batch_size", TRAINING_PARAMS["micro_batch_size"].default)
    accum = data.get("grad_accum_steps", TRAINING_PARAMS["grad_accum_steps"].default)
    if not effective or effective == micro * accum:
        return []
    fix = f"grad_accum_steps: {effective // micro}, or " if effective % micro == 0 else ""
    return [(f"{path}: effective_batch_size: {effective} is not micro_batch_size x grad_accum_steps ({micro} x "
             f"{accum}); set {fix}effective_batch_size: 0")]


def _as_recipe_key(path: Path, problem: str, overridden: set[str]) -> str:
    """'--max-steps: ...' about a value the recipe gave -> '<file>: max_steps: ...' (an option given on the
    command line keeps its own name)."""
    option, sep, rest = problem.partition(": ")
    key = option.removeprefix("--").replace("-", "_")
    key = "split_seed" if key == "seed" else key  # the search's --seed is the recipe's split_seed
    if not sep or not option.startswith("--") or key not in _ALLOWED or key in overridden:
        return problem
    return f"{path}: {key}: {rest}"


def in_recipe_terms(path: Path, problem: str, overridden: frozenset[str] = frozenset()) -> str:
    """A problem worded for the search's options ('--task: ... (set it with --label-column)'), in the words of
    the recipe that gave those values ('<file>: task: ... (set it with label_column)'): `autopeft train` has no
    such options. A problem that names no single key ('--text-column 'label', --label-column 'label': ...')
    is the file's too. One about an `overridden` value keeps its option's name: the command line gave it."""
    if problem.partition(": ")[0].removeprefix("--").replace("-", "_") in overridden:
        return problem

    def as_key(match: re.Match[str]) -> str:
        key = match.group(1).replace("-", "_")
        return key if key in _ALLOWED else match.group(0)

    # An option stands first, after a space or in brackets; a path or value that holds '--' is left alone.
    worded = re.sub(r"(?<![^\s(])--([a-z][a-z-]*)", as_key, _as_recipe_key(path, problem, set()))
    return worded if worded.startswith(f"{path}: ") else f"{path}: {worded}"


@contextmanager
def worded_by(path: Path) -> Iterator[None]:
    """Problems raised inside, with the recipe's values worded by its keys (`in_recipe_terms`)."""
    try:
        yield
    except (DataError, ModelError) as exc:
        raise type(exc)(in_recipe_terms(path, str(exc))) from None
    except ConfigError as exc:
        raise ConfigError([in_recipe_terms(path, problem) for problem in exc.problems]) from None


def read_recipe(path: Path, **overrides: Any) -> tuple[SearchConfig, TrialParams, int]:
    """(the search config that rebuilds the model and split, the trial's parameters, the training seed)."""
    try:
        data = load_yaml_file(path)
    except FileNotFoundError:
        raise ConfigError([f"--config: {path} does not exist"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"--config: {path} is {yaml_problem(exc)}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"--config: {path} is not UTF-8 text (a YAML recipe, as `autopeft export` writes)"]) from None
    except IsADirectoryError:
        raise ConfigError([(f"--config: {path} is a folder; give its training.yaml (a YAML recipe, as `autopeft export` "
                           "writes)")]) from None
    missing = [k for k in _REQUIRED if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConfigError([f"{path}: missing key(s) {', '.join(missing)}"])
    problems = _problems(path, data)
    if problems:
        raise ConfigError(problems)
    steps = data["max_steps"] if overrides.get("max_steps") is None else overrides["max_steps"]  # 0 is refused
    task = {k: tuple(data[k]) if isinstance(data[k], list) else data[k] for k in _TASK_KEYS if k in data}
    try:
        config = SearchConfig(**{k: data[k] for k in _DATA_KEYS}, **task, seed=data["split_seed"], max_steps=steps,
                              **{k: v for k, v in overrides.items() if k != "max_steps" and v is not None})
    except ConfigError as exc:  # the recipe's own values are named by their keys in the file, not as options
        given = {k for k, v in overrides.items() if v is not None}
        raise ConfigError([in_recipe_terms(path, problem, frozenset(given)) for problem in exc.problems]) from None
    training = {k: _as_declared(spec, data.get(k, spec.default)) for k, spec in TRAINING_PARAMS.items()}
    method = methods.get(data["method"])
    own = {k: _as_declared(method.params[k], v) if k in method.params else v for k, v in data["method_params"].items()}
    params = TrialParams(data["method"], method.resolve(own), training)
    return config, params, int(data["seed"])


def _as_declared(spec: Any, value: Any) -> Any:
    """An integer written as a float (`micro_batch_size: 8.0`, allowed by the check) as the int it is: a float
    batch size stopped training with a TypeError."""
    return int(value) if spec.kind == "int" and isinstance(value, float) else value
