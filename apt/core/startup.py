"""What keeps importing APT fast: the cyclic garbage collector paused while APT's modules load.

Importing APT builds many long-lived objects (its config classes and their pydantic
validators, the engine's classes). Each collection the interpreter runs meanwhile walks every
object the process holds, and after ``import torch`` those are well over a million: on two
cores that was about 0.1 s of a 0.3 s import, spent on objects that live as long as the
process (``benchmarks/startup.py``; docs/performance.md, "Start-up").
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["collector_paused"]


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector inside the block; on leaving it (an exception too),
    it runs again if it ran before. Reference counting still frees everything it can."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
