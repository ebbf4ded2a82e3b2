"""Stop requests from Ctrl-C and SIGTERM, for the loops that stop cleanly at a boundary (training steps,
evaluation env steps): the first signal asks, a second stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """While the block runs, the first Ctrl-C or SIGTERM (`kill`, a scheduler's time limit) only sets the yielded
    event, which the loop checks at its next boundary (a KeyboardInterrupt raised mid-step could leave a queue
    half-read or a step half-done), and a second raises KeyboardInterrupt. Signals that are ignored (SIGINT of a
    job started with `&` from a script) stay so; outside the main thread, where no handler can be set, nothing
    changes. The previous handlers come back when the block ends."""
    asked = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def handler(signum: int, frame) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, previous in old.items():
        if previous is not signal.SIG_IGN:
            signal.signal(sig, handler)
    try:
        yield asked
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
