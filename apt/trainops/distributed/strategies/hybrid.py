"""``hybrid``: FSDP2 over tensor-parallel groups (``dp_shard`` x ``tp``, 2-D DTensors).

The model is first split over the ``tp`` sub-mesh as ``tensor`` splits it (sequence parallel
too with ``sequence_parallel: true``), then each transformer block and the root are sharded
over the ``dp_shard`` sub-mesh as ``fsdp`` shards them: every parameter becomes a DTensor on
the 2-D (dp_shard, tp) mesh, e.g. q_proj's weight ``(Shard(0), Shard(0))``, a norm's
``(Shard(0), Replicate())``. The ``tp`` ranks of one data-parallel rank read one batch; the
``dp_shard`` groups read different batches and reduce-scatter their gradients, so a step
trains on ``dp_shard x batch_size x gradient_accumulation_steps`` sequences.

Layout on 4 ranks (``dp_shard: 2, tp: 2``)::

    rank 0, 1: one tp group, data shard 0        rank 2, 3: one tp group, data shard 1
    FSDP groups (same tp coordinate): {0, 2}, {1, 3}
"""

from __future__ import annotations

import logging

from torch import nn

from apt.trainops.distributed.strategies.fsdp import FSDPStrategy, apply_fsdp
from apt.trainops.distributed.strategies.tensor import TensorStrategy

__all__ = ["HybridStrategy"]

log = logging.getLogger(__name__)


class HybridStrategy(TensorStrategy, FSDPStrategy):
    """``tensor`` (or ``sequence``) inside, ``fsdp`` outside.

    From :class:`TensorStrategy`: the split by the model's plan, loss-parallel cross-entropy,
    plain outputs and the gradient norm over layouts. From :class:`FSDPStrategy`: the
    ``training.distributed.fsdp`` options (mixed precision, resharding), gradient sync skipped
    between micro-batches, and the per-block compile.
    """

    name = "hybrid"

    def apply(self, model: nn.Module) -> nn.Module:
        model = model.to(self.env.device)
        if not self.sharded:
            log.warning("strategy hybrid in a single process without a process group: not split")
            return model
        assert self.mesh is not None  # built by build_strategy inside a process group
        self.split_tensors(model)
        return apply_fsdp(model, self.cfg.fsdp, dp_mesh=self.mesh["dp_shard"], mp=self._mp_policy())
