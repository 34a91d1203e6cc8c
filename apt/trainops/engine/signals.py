"""SIGTERM / SIGINT: finish at the next safe point, save, and leave cleanly; twice: leave now.

A first signal asks the loop to save and exit at the next safe point: the end of the step in
progress, or the evaluation in progress (which is abandoned between two batches). A second
one, of either kind, stops at once without saving: :class:`StopNow` is raised where the
process is, and the CLI says that the newest checkpoint is the one to resume from.

DataLoader worker processes inherit the handler when they fork; in them it does nothing (the
main process shuts them down), so a Ctrl-C prints one message, not one per worker.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["StopNow", "graceful_exit"]

log = logging.getLogger("apt")


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without saving.

    Attributes:
        signum: the signal received.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def graceful_exit(request: Callable[[int], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to ``request(signum)`` while the block runs.

    Outside the main thread (signals cannot be caught there) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    previous: dict[signal.Signals, Any] = {}
    received: list[int] = []

    def handle(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked DataLoader worker: the main process decides
            return
        if received:
            raise StopNow(signum)
        received.append(signum)
        log.warning(
            "received %s: saving a checkpoint at the next safe point (the end of this step or "
            "of this evaluation), then exiting; the same command resumes. Press Ctrl-C again "
            "to stop at once without saving.",
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
