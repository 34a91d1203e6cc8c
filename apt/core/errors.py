"""The errors APT raises for its users.

Every error a user can cause derives from :class:`APTError` and carries a message that says what
was wrong, where (file, key, step, rank) and what to do about it. The CLI prints the message and
exits with a code chosen by the error's class, never a traceback.
"""

from __future__ import annotations

__all__ = [
    "APTError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
]


class APTError(Exception):
    """Base class of every error APT raises because of user input or the environment.

    Attributes:
        exit_code: the process exit code the CLI uses when this error ends a command.
    """

    exit_code: int = 1


class ConfigError(APTError):
    """A profile, override or config value is invalid (CLI exit code 2)."""

    exit_code = 2


class CheckpointError(APTError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with the run."""


class DataError(APTError):
    """A dataset file is missing, unreadable or too small for the requested shapes."""


class DistributedError(APTError):
    """The distributed environment is inconsistent, or a peer rank failed."""
