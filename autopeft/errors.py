"""One exception tree. The CLI turns every `AutopeftError` into one line per problem and exit code 2."""

from __future__ import annotations


class AutopeftError(Exception):
    """A problem with the user's input or environment; never a bug in autopeft."""


class ConfigError(AutopeftError):
    """One or more problems in a config or search-space file, all collected before anything runs."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(AutopeftError):
    """The task data cannot be loaded or does not have the shape a task needs."""


class RareClassError(DataError):
    """A class has too few rows to put one in every split: often free answers taken for classes."""


class ModelError(AutopeftError):
    """The model cannot be found or loaded."""


class StudyError(AutopeftError):
    """The study or its storage is unusable for what was asked (missing, incompatible, unreachable)."""


class TrialFailed(Exception):
    """A trial ended without a result; `reason` is recorded on the trial and the search goes on."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, for a one-line refusal or failure reason: its first non-blank line
    (libraries often open with a newline or follow with a traceback-like dump), else its type's name."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 -- a broken __str__ must not turn one failed trial into a crashed search
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
