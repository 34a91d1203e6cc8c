"""Registered strategies: ``single``, ``ddp``, ``fsdp``, ``tensor``, ``sequence``, ``hybrid``,
``pipeline`` (see :func:`build_strategy`).

``FSDPStrategy``, ``transformer_blocks``, ``TensorStrategy`` and ``PipelineStrategy`` are
imported on first use (FSDP2 and tensor parallelism import DTensor, the pipeline
``torch.distributed.pipelining``: time that a run on one device or DDP never needs).
"""

from typing import Any

from apt.trainops.distributed.strategies.base import (
    STRATEGIES,
    MicroBatches,
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
    "HybridStrategy",
    "MicroBatches",
    "PipelineStrategy",
    "SequenceStrategy",
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
    if name in ("TensorStrategy", "SequenceStrategy"):
        from apt.trainops.distributed.strategies import tensor

        return getattr(tensor, name)
    if name == "HybridStrategy":
        from apt.trainops.distributed.strategies.hybrid import HybridStrategy

        return HybridStrategy
    if name == "PipelineStrategy":
        from apt.trainops.distributed.strategies.pipeline import PipelineStrategy

        return PipelineStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
