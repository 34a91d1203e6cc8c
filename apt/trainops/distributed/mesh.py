"""The parallel degrees of a run and the one ``DeviceMesh`` built from them.

Ranks are laid out as torchtitan's ParallelDims lays them out, the innermost dimension last::

    rank = ((p * dp_replicate + r) * dp_shard + s) * tp + t
                                    p: pp, r: dp_replicate, s: dp_shard, t: tp coordinate

so the ranks of one tensor-parallel group are neighbours (on one node, where the links are
fast), and the ranks that share the ``p`` and ``t`` coordinates form one data-parallel group:
they read different data, while all ``tp`` ranks and all pipeline stages of a data-parallel
rank read the same batch. The pipeline dimension is outermost: its point-to-point sends are
the smallest traffic, the one that may cross nodes.

>>> dims = ParallelDims.resolve(cfg.training.distributed, world_size=4)   # doctest: +SKIP
>>> mesh = dims.build_mesh("cpu")   # dims ("pp", "dp_replicate", "dp_shard", "tp")  # +SKIP
>>> mesh["tp"]                             # the sub-mesh apply_tp takes    # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from apt.core.config.distributed import MESH_DIMS, DistributedConfig
from apt.trainops.distributed.collectives import RankSums, SideChannel

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MESH_DIMS", "ParallelDims", "data_parallel_sums"]


@dataclass(frozen=True)
class ParallelDims:
    """How many ways each mesh dimension splits the run (their product is the world size).

    Attributes:
        dp_replicate: data-parallel replicas (DDP).
        dp_shard: data-parallel shards (FSDP2).
        tp: tensor-parallel degree.
        pp: pipeline-parallel degree (ranks the model's stages are spread over).
    """

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @classmethod
    def resolve(cls, cfg: DistributedConfig, *, world_size: int) -> ParallelDims:
        """The degrees ``cfg`` gives on ``world_size`` processes.

        Raises:
            ConfigError: they do not multiply to ``world_size`` (the message shows the
                arithmetic), or they combine parallelisms not supported yet.
        """
        if cfg.strategy == "single":
            return cls()
        return cls(**cfg.degrees(world_size))

    @property
    def world_size(self) -> int:
        """Processes the degrees fill."""
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: how many different batches one step reads."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank`` (which share of the data it reads)."""
        return (rank // self.tp) % self.dp_size

    def dp_groups(self) -> list[list[int]]:
        """The global ranks of every data-parallel group (one per pp and tp coordinate)."""
        block = self.dp_size * self.tp  # the ranks of one pipeline stage
        return [
            list(range(p * block + t, (p + 1) * block, self.tp))
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def pp_rank(self, rank: int) -> int:
        """The pipeline coordinate of global ``rank`` (which stages it holds)."""
        return rank // (self.dp_size * self.tp)

    def pp_groups(self) -> list[list[int]]:
        """The global ranks of every pipeline (one per data-parallel and tp coordinate), in
        stage order."""
        block = self.dp_size * self.tp
        return [list(range(i, self.world_size, block)) for i in range(block)]

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The run's one DeviceMesh, dimensions :data:`MESH_DIMS`. Collective: every rank
        builds it at the same point, inside a started process group."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)

    def __str__(self) -> str:
        shown = [dim for dim in MESH_DIMS if dim != "pp" or self.pp > 1]
        return " x ".join(f"{dim} {getattr(self, dim)}" for dim in shown)


def data_parallel_sums(dims: ParallelDims, *, rank: int, timeout_seconds: float) -> RankSums:
    """The loop's :class:`RankSums` over this rank's data-parallel group.

    Target counts, the loss and metrics are summed over the data-parallel ranks only (the tp
    ranks and pipeline stages of one data-parallel rank hold the same batch); whether to stop
    for a signal is agreed by every rank. Collective to create: every rank calls it at the
    same point.
    """
    world = dims.world_size
    if world == 1:
        return RankSums(1, None)
    if dims.dp_size == world:  # data parallel only: one group of everyone, as before
        return RankSums(world, SideChannel(timeout_seconds))
    everyone = SideChannel(timeout_seconds)
    if dims.dp_size == 1:  # tensor or pipeline parallel only: one batch for all, no sum
        return RankSums(1, None, everyone=everyone)
    side: SideChannel | None = None
    group: dist.ProcessGroup | None = None
    for ranks in dims.dp_groups():  # every rank creates every group (c10d's rule)
        channel = SideChannel(timeout_seconds, ranks=ranks)
        device_group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_seconds))
        if rank in ranks:
            side, group = channel, device_group
    return RankSums(dims.dp_size, side, group=group, everyone=everyone)
