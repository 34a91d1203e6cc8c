"""Distributed training: the process group, the DeviceMesh, strategies (single, DDP, FSDP2,
tensor parallel) and their state dicts.

>>> env = setup_distributed()                                   # doctest: +SKIP
>>> strategy = build_strategy(cfg.training.distributed, env=env)  # the mesh too  # +SKIP
>>> model = strategy.apply(model)                               # doctest: +SKIP

Everything here is torch.distributed itself (c10d, DDP, FSDP2 ``fully_shard`` and the
state-dict API); APT adds the configuration, the checks and the error messages.
"""

from typing import Any

from apt.trainops.distributed.collectives import (
    RankSums,
    SideChannel,
    all_reduce_mean,
    barrier,
    distributed_errors,
    is_main_process,
    rank_zero_only,
)
from apt.trainops.distributed.ddp_wrapper import DDPWrapper
from apt.trainops.distributed.env import (
    DistEnv,
    check_world_size,
    exit_process,
    group_rank,
    group_world_size,
    in_process_group,
    read_launcher_env,
    setup_distributed,
    teardown_distributed,
)
from apt.trainops.distributed.mesh import MESH_DIMS, ParallelDims, data_parallel_sums
from apt.trainops.distributed.strategies import (
    STRATEGIES,
    DDPStrategy,
    SingleStrategy,
    Strategy,
    build_strategy,
    unwrap_model,
)

__all__ = [
    "MESH_DIMS",
    "STRATEGIES",
    "DDPStrategy",
    "DDPWrapper",
    "DistEnv",
    "FSDPStrategy",
    "ParallelDims",
    "RankSums",
    "SideChannel",
    "SingleStrategy",
    "Strategy",
    "TensorStrategy",
    "all_reduce_mean",
    "barrier",
    "build_strategy",
    "check_world_size",
    "data_parallel_sums",
    "distributed_errors",
    "exit_process",
    "group_rank",
    "group_world_size",
    "in_process_group",
    "is_main_process",
    "rank_zero_only",
    "read_launcher_env",
    "setup_distributed",
    "teardown_distributed",
    "unwrap_model",
]


def __getattr__(name: str) -> Any:
    if name == "FSDPStrategy":  # imported on first use: FSDP2 brings DTensor with it
        from apt.trainops.distributed.strategies.fsdp import FSDPStrategy

        return FSDPStrategy
    if name == "TensorStrategy":  # imported on first use: DTensor
        from apt.trainops.distributed.strategies.tensor import TensorStrategy

        return TensorStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
