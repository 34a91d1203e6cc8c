"""SIGTERM / SIGINT: finish the current step, save, and leave cleanly."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["graceful_exit"]

log = logging.getLogger("apt")


@contextmanager
def graceful_exit(request: Callable[[int], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``request(signum)`` while the block runs.

    The first signal asks the loop to save at the next step boundary and stop; a second SIGINT
    (Ctrl-C pressed twice) interrupts at once. Outside the main thread (signals cannot be
    caught there) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        log.warning(
            "received %s: saving a checkpoint at the end of this step, then exiting "
            "(run the same command to resume)",
            signal.Signals(signum).name,
        )
        request(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
