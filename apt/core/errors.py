"""The errors APT raises for its users.

Every error a user can cause derives from :class:`APTError` and carries a message that says what
was wrong, where (file, key, step, rank) and what to do about it. The CLI prints the message and
exits with a code chosen by the error's class, never a traceback.
"""

from __future__ import annotations

from apt.core.redact import redact

__all__ = [
    "APTError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "ModelStoreError",
    "TrainingDiverged",
]


class APTError(Exception):
    """Base class of every error APT raises because of user input or the environment.

    Text arguments go through :func:`apt.core.redact.redact`, so a message that quotes a value
    (a URI with a password, a ``token=`` parameter) never shows the secret.

    Attributes:
        exit_code: the process exit code the CLI uses when this error ends a command.
    """

    exit_code: int = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(arg) if isinstance(arg, str) else arg for arg in args))


class ConfigError(APTError):
    """A profile, override or config value is invalid (CLI exit code 2)."""

    exit_code = 2


class CheckpointError(APTError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with the run."""


class ModelStoreError(CheckpointError):
    """A model name is not valid, not in the local model store, or taken already (CLI exit
    code 2). A :class:`CheckpointError`, so code that catches a model folder that cannot be
    loaded catches a name that cannot be found too."""

    exit_code = 2


class DataError(APTError):
    """A dataset file is missing, unreadable or too small for the requested shapes."""


class DistributedError(APTError):
    """The distributed environment is inconsistent, or a peer rank failed."""


class TrainingDiverged(APTError):
    """The loss, the gradients or the weights stopped being finite (CLI exit code 3)."""

    exit_code = 3
