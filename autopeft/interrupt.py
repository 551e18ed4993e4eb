"""Ctrl-C as a flag as well as an exception. Some libraries turn a KeyboardInterrupt that lands inside them
into an ordinary error (sqlite3 reports "interrupted"), which would look like one failed trial and let the
search go on. The flag lets the search see that the user asked to stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType

REQUESTED = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    REQUESTED.set()
    raise KeyboardInterrupt


def install() -> None:
    """Call once from the command's main thread before a search starts."""
    REQUESTED.clear()
    signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise KeyboardInterrupt at a safe point if Ctrl-C was pressed (and swallowed somewhere)."""
    if REQUESTED.is_set():
        raise KeyboardInterrupt
