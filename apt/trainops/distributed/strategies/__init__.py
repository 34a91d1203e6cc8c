"""Registered strategies: ``single``, ``ddp``, ``fsdp``, ``tensor`` (see :func:`build_strategy`).

``FSDPStrategy``, ``transformer_blocks`` and ``TensorStrategy`` are imported on first use (FSDP2
and tensor parallelism import DTensor, half a second that a run on one device or DDP never
needs).
"""

from typing import Any

from apt.trainops.distributed.strategies.base import (
    STRATEGIES,
    Strategy,
    build_strategy,
    unwrap_model,
)
from apt.trainops.distributed.strategies.ddp import DDPStrategy
from apt.trainops.distributed.strategies.single import SingleStrategy

__all__ = [
    "STRATEGIES",
    "DDPStrategy",
    "FSDPStrategy",
    "SingleStrategy",
    "Strategy",
    "TensorStrategy",
    "build_strategy",
    "transformer_blocks",
    "unwrap_model",
]


def __getattr__(name: str) -> Any:
    if name in ("FSDPStrategy", "transformer_blocks"):
        from apt.trainops.distributed.strategies import fsdp

        return getattr(fsdp, name)
    if name == "TensorStrategy":
        from apt.trainops.distributed.strategies.tensor import TensorStrategy

        return TensorStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
