"""APT: a config-driven PyTorch framework for training transformer language models.

>>> from apt import load_profile, Trainer
>>> result = Trainer.from_config(load_profile("quickstart")).train()   # doctest: +SKIP

The engine classes are imported on first use, so ``import apt`` and config-only CLI commands
stay fast; APT's modules load with the garbage collector paused (:mod:`apt.core.startup`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apt.core.startup import collector_paused

with collector_paused():  # apt.core.startup says why
    from apt.core.config import APTConfig, load_profile
    from apt.core.errors import APTError, CheckpointError, ConfigError, DataError, DistributedError
    from apt.core.version import __version__

__all__ = [
    "APTConfig",
    "APTError",
    "APTLargeModel",
    "APTModel",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistributedError",
    "Finetuner",
    "Trainer",
    "__version__",
    "load_profile",
]

_LAZY = {
    "Trainer": "apt.trainops.engine",
    "Finetuner": "apt.trainops.engine",
    "APTModel": "apt.model",
    "APTLargeModel": "apt.model",
}

if TYPE_CHECKING:
    from apt.model import APTLargeModel, APTModel
    from apt.trainops.engine import Finetuner, Trainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        with collector_paused():
            return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'apt' has no attribute {name!r}")
