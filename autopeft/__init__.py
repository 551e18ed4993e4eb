"""autopeft: search PEFT configurations (method, hyperparameters, optimizer, precision) under a memory budget.

The public names load lazily so that `autopeft --help` does not import torch, transformers and MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchConfig": "config", "parse_memory": "config",
    "AutopeftError": "errors", "ConfigError": "errors", "DataError": "errors", "ModelError": "errors",
    "StudyError": "errors", "TrialFailed": "errors",
    "export_trial": "export", "select_trial": "export",
    "run_search": "search",
    "SearchSpace": "space", "TrialParams": "space", "load_space": "space",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'autopeft' has no attribute {name!r}")
    return getattr(importlib.import_module(f"autopeft.{_EXPORTS[name]}"), name)
