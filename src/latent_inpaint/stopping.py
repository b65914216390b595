"""SIGTERM as an exception, so that a stopped command cleans up like an interrupted one.

Python's default SIGTERM ends the process at once: no `finally`, no message, child processes
left behind. Inside `sigterm_stops()` SIGTERM raises `Stopped` (a KeyboardInterrupt) in the
main thread instead; the code it interrupts removes what it had half written and says what is
kept. Training has its own handler (checkpoint, then exit) and does not use this one.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Stopped(KeyboardInterrupt):
    """The process was asked to stop; `signum` is the signal, the message says what is kept."""

    def __init__(self, message: str = "", signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum=signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
