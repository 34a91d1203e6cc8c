"""``single``: one process, no wrapper."""

from __future__ import annotations

from apt.trainops.distributed.strategies.base import STRATEGIES, Strategy

__all__ = ["SingleStrategy"]


@STRATEGIES.register("single")
class SingleStrategy(Strategy):
    """The model on one device; every method of the contract is the plain PyTorch one."""

    name = "single"
