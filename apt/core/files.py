"""File permissions: files APT writes are as readable as the user's umask says."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["apply_umask"]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would have (``0o666`` less the umask).

    Some writers (safetensors' ``save_file``) create files as ``0o600``; an exported model must
    be readable by the others the user's umask lets read files.
    """
    os.chmod(path, 0o666 & ~_umask())
