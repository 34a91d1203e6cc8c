"""The errors of the run folder: in use by another run, unusable, or an export that failed."""

from __future__ import annotations

from pathlib import Path

from apt.core.errors import APTError

__all__ = ["ExportError", "RunFolderError", "RunLockedError"]


class RunFolderError(APTError):
    """The run folder (or a folder the run writes) cannot be used: it is a file, it cannot be
    created or written, or another run holds it (CLI exit code 2)."""

    exit_code = 2


class RunLockedError(RunFolderError):
    """Another live process holds the lock of the folder.

    Attributes:
        path: the lock file.
        holder: what the lock file says about its holder (``host``, ``pid``, ``started``);
            empty when it was unreadable.
    """

    def __init__(self, message: str, *, path: Path, holder: dict[str, object]) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


class ExportError(APTError):
    """Writing an exported model failed; nothing partial is left at its path.

    Attributes:
        path: the folder the model was being written to.
        disk_full: the failure was ENOSPC / EDQUOT.
    """

    def __init__(self, message: str, *, path: Path, disk_full: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.disk_full = disk_full
