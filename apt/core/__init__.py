"""Foundations shared by every APT domain: config, errors, registry."""

from apt.core.errors import APTError, CheckpointError, ConfigError, DataError, DistributedError
from apt.core.registry import Registry

__all__ = [
    "APTError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "Registry",
]
