"""Ctrl-C as a flag as well as an exception. Some libraries turn a KeyboardInterrupt that lands inside them
into an ordinary error (sqlite3 reports "interrupted"), which would look like one failed trial and let the
search go on. The flag lets the search see that the user asked to stop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

REQUESTED = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    REQUESTED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Ctrl-C sets the flag while the block runs (from the command's main thread); afterwards the caller's own
    handler is back and the flag clear: a process that goes on (a notebook running the command in-process)
    would otherwise stop its next search at the first step."""
    previous = signal.getsignal(signal.SIGINT)
    REQUESTED.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        REQUESTED.clear()


def check() -> None:
    """Raise KeyboardInterrupt at a safe point if Ctrl-C was pressed (and swallowed somewhere)."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt
