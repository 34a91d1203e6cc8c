"""Registered strategies: ``single``, ``ddp``, ``fsdp`` (see :func:`build_strategy`)."""

from apt.trainops.distributed.strategies.base import (
    STRATEGIES,
    Strategy,
    build_strategy,
    unwrap_model,
)
from apt.trainops.distributed.strategies.ddp import DDPStrategy
from apt.trainops.distributed.strategies.fsdp import FSDPStrategy, transformer_blocks
from apt.trainops.distributed.strategies.single import SingleStrategy

__all__ = [
    "STRATEGIES",
    "DDPStrategy",
    "FSDPStrategy",
    "SingleStrategy",
    "Strategy",
    "build_strategy",
    "transformer_blocks",
    "unwrap_model",
]
