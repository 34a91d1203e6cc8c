"""Foundations shared by every APT domain: config, errors, registry, redaction."""

from apt.core.errors import APTError, CheckpointError, ConfigError, DataError, DistributedError
from apt.core.redact import redact
from apt.core.registry import Registry

__all__ = [
    "APTError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "Registry",
    "redact",
]
