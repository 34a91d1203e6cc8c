"""The checkpoint errors: a failed save carries what the Trainer needs to stop or go on; a
sound checkpoint that does not fit the objects given is told apart from a corrupt one."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from apt.core.errors import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "human_bytes",
    "save_error_from_os",
]


class CheckpointSaveError(CheckpointError):
    """A save failed; nothing of it is advertised and ``LATEST`` still names the previous one.

    The Trainer applies ``training.checkpoints.on_save_error`` (stop or continue) to this error.

    Attributes:
        step: the step whose save failed.
        path: the file or folder that could not be written.
        disk_full: the failure was ENOSPC / EDQUOT.
    """

    def __init__(self, message: str, *, step: int, path: Path, disk_full: bool = False) -> None:
        super().__init__(message)
        self.step = step
        self.path = path
        self.disk_full = disk_full


class CheckpointMismatchError(CheckpointError):
    """The checkpoint verifies, but what it holds does not fit the objects given to load it
    into (a part it lacks, a tensor of another name, shape or dtype, an optimizer with other
    parameter groups).

    ``load_latest`` skips such a checkpoint like a corrupt one only when an older checkpoint
    does fit (then this one is what is wrong); when none fits it raises this error and moves
    nothing, since then the objects, not the checkpoints, have changed.
    """


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def save_error_from_os(exc: OSError, *, step: int, save_dir: Path) -> CheckpointSaveError:
    """Turn an OSError raised while saving ``step`` into a message that says what to do."""
    where = Path(exc.filename) if exc.filename else save_dir
    disk_full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if disk_full:
        try:
            free = human_bytes(shutil.disk_usage(save_dir).free)
        except OSError:
            free = "unknown"
        message = (
            f"disk full while saving the checkpoint of step {step} at {where} ({free} free on "
            f"{save_dir}). The partial checkpoint was removed and LATEST still names the previous "
            "one. Free space, lower training.checkpoints.keep_last_n, or point "
            "training.checkpoints.directory at a larger disk."
        )
    else:
        message = (
            f"could not write the checkpoint of step {step} at {where}: {exc.strerror or exc}. "
            "The partial checkpoint was removed and LATEST still names the previous one."
        )
    return CheckpointSaveError(message, step=step, path=where, disk_full=disk_full)
