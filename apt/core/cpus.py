"""How many CPUs this process may use, and how to share them without oversubscribing."""

from __future__ import annotations

import os

__all__ = ["available_cpus", "default_cpu_threads"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or Slurm's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity masks
        return os.cpu_count() or 1


def default_cpu_threads(*, processes: int = 1, workers: int = 0) -> int:
    """Intra-op threads per training process so that ``processes`` processes on this machine,
    each with ``workers`` DataLoader worker processes, use no more CPUs than there are.

    Each worker process counts as one CPU taken (they run while the step computes). An
    ``OMP_NUM_THREADS`` the user exported wins: it is the knob every PyTorch user knows.
    """
    exported = os.environ.get("OMP_NUM_THREADS", "")
    if exported.isdigit() and int(exported) > 0:
        return int(exported)
    share = available_cpus() // max(processes, 1)
    return max(1, share - workers)
