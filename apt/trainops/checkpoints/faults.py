"""Fault injection: a test hook that stops a save at an exact point.

This is the only environment read in :mod:`apt.trainops.checkpoints`, and it exists for tests
only (the fault-injection suite kills real runs at the points below). Normal runs never set it.

``APT_FAULT_INJECT`` holds one or more comma-separated points, each optionally ``@<step>`` so it
fires only while saving that step, and ``:<rank>`` so it fires only in the process whose
``RANK`` (set by torchrun) is that rank::

    APT_FAULT_INJECT=kill_before_rename@1200
    APT_FAULT_INJECT=enospc_on_write
    APT_FAULT_INJECT=enospc_on_write@10:1

Points:
    kill_before_manifest: every payload file is written and fsynced, the manifest is not.
    kill_before_rename: the manifest is written; the stage folder is not renamed yet.
    kill_mid_replace: an existing folder of the same step was moved aside; the new one is not
        in place yet.
    kill_before_latest: the checkpoint is renamed into place; ``LATEST`` is not updated yet.
    kill_in_async_write: inside the background writer, after its first file.
    enospc_on_write: the first file write raises ``OSError(ENOSPC)``.
    enospc_on_export: the final model export (:mod:`apt.trainops.artifacts.export`) raises
        ``OSError(ENOSPC)`` before its first file.

A ``kill_*`` point sends SIGKILL to this process (nothing runs after it, as on a power cut or
an OOM kill); ``enospc_on_write`` raises as a full disk would.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["ENV_VAR", "POINTS", "fault_armed", "maybe_kill", "maybe_raise_enospc"]

ENV_VAR = "APT_FAULT_INJECT"

POINTS = (
    "kill_before_manifest",
    "kill_before_rename",
    "kill_mid_replace",
    "kill_before_latest",
    "kill_in_async_write",
    "enospc_on_write",
    "enospc_on_export",
)


def fault_armed(point: str, step: int) -> bool:
    """True when ``APT_FAULT_INJECT`` names ``point`` for ``step`` (or for every step) and for
    this process's rank (or for every rank)."""
    spec = os.environ.get(ENV_VAR, "")
    if not spec:
        return False
    rank = int(os.environ.get("RANK", "0"))
    for item in spec.split(","):
        item, _, on_rank = item.strip().partition(":")
        name, _, at = item.partition("@")
        if name == point and (not at or int(at) == step) and (not on_rank or int(on_rank) == rank):
            return True
    return False


def maybe_kill(point: str, step: int) -> None:
    """SIGKILL this process when ``point`` is armed for ``step``."""
    if fault_armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_raise_enospc(path: str, step: int) -> None:
    """Raise ``OSError(ENOSPC)`` for ``path`` when ``enospc_on_write`` is armed for ``step``."""
    if fault_armed("enospc_on_write", step):
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
