"""``expert``: MoE experts split over the ranks (all-to-all token dispatch), the rest of the
model replicated and averaged by DDP.

The ``ep`` ranks are the data-parallel ranks: each reads its own batch and routes its own
tokens; the all-to-all sends each token to the rank that holds its expert and brings the
result back (:mod:`apt.trainops.distributed.expert_parallel`). DDP averages every gradient but
the experts', which arrive summed over the ranks through the all-to-all and are divided by
``ep`` on the way in. Checkpoints are DCP: each rank writes its own experts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apt.core.config.distributed import DistributedConfig
from apt.trainops.distributed.env import DistEnv
from apt.trainops.distributed.expert_parallel import apply_ep, expert_parameter_names
from apt.trainops.distributed.strategies.ddp import DDPStrategy, apply_ddp
from apt.trainops.distributed.strategies.tensor import clip_grad_norm_by_layout_

__all__ = ["ExpertStrategy"]

log = logging.getLogger(__name__)


class ExpertStrategy(DDPStrategy):
    """Expert parallelism over the data-parallel ranks (``ep`` = the number of processes).

    In a process without a process group the model is not split and the run is a single one.
    """

    name = "expert"

    def __init__(self, cfg: DistributedConfig, *, env: DistEnv, **kwargs: Any) -> None:
        super().__init__(cfg, env=env, **kwargs)
        self.sharded = dist.is_available() and dist.is_initialized()

    def apply(self, model: nn.Module) -> nn.Module:
        model = model.to(self.env.device)
        if not self.sharded:
            log.warning("strategy expert in a single process without a process group: not split")
            return model
        assert self.mesh is not None  # built by build_strategy inside a process group
        dp_mesh = self.mesh["dp_replicate"]
        split = apply_ep(model, ep_mesh=dp_mesh)
        if self.env.is_main:
            log.info("expert parallel: the experts of %d MoE layers over %d ranks", len(split),
                     dp_mesh.size())  # fmt: skip
        # DDP must leave the experts alone: each rank holds other ones.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, expert_parameter_names(model)
        )
        return apply_ddp(model, self.cfg.ddp, dp_mesh=dp_mesh, device=self.env.device)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The base contract over the experts' shards (DTensor) and the replicated rest."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        return clip_grad_norm_by_layout_(params, max_norm)
