"""``ddp``: every rank holds the whole model; gradients are averaged (DistributedDataParallel)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apt.core.config.distributed import DDPOptions
from apt.trainops.distributed.ddp_wrapper import DDPWrapper, model_has_moe
from apt.trainops.distributed.strategies.base import STRATEGIES, Strategy

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["DDPStrategy", "apply_ddp"]

log = logging.getLogger(__name__)


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP module of ``model``, under a ``torch.compile`` wrapper if there is one."""
    while not isinstance(model, DistributedDataParallel):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


def apply_ddp(
    model: nn.Module,
    opts: DDPOptions,
    *,
    dp_mesh: DeviceMesh | None,
    device: torch.device,
) -> DistributedDataParallel:
    """Replicate ``model`` over ``dp_mesh`` (the ``dp_replicate`` sub-mesh; None: every rank)
    with ``training.distributed.ddp`` options."""
    find_unused = opts.find_unused_parameters
    if find_unused is None:
        find_unused = model_has_moe(model)
    return DDPWrapper(
        model,
        device=device,
        process_group=dp_mesh.get_group() if dp_mesh is not None else None,
        bucket_cap_mb=opts.bucket_cap_mb,
        static_graph=opts.static_graph,
        find_unused_parameters=find_unused,
        # Gradients live in the communication buckets: no copy in or out per step.
        gradient_as_bucket_view=True,
    )


@STRATEGIES.register("ddp")
class DDPStrategy(Strategy):
    """DistributedDataParallel with ``training.distributed.ddp`` options.

    ``find_unused_parameters: null`` turns it on for models that declare an ``moe`` module (an
    expert that gets no token has no gradient). In a process without a process group (one
    process, not started by torchrun) the model is not wrapped and the run is a single one.
    """

    name = "ddp"

    def apply(self, model: nn.Module) -> nn.Module:
        model = model.to(self.env.device)
        if not (dist.is_available() and dist.is_initialized()):
            log.warning("strategy ddp in a single process without a process group: not wrapped")
            return model
        dp_mesh = self.mesh["dp_replicate"] if self.mesh is not None else None
        return apply_ddp(model, self.cfg.ddp, dp_mesh=dp_mesh, device=self.env.device)

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        ddp = _find_ddp(model)
        if ddp is None:
            yield
            return
        with ddp.no_sync():
            yield
