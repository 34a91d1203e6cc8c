"""``fsdp``: parameters, gradients and optimizer state sharded over ranks (FSDP2 ``fully_shard``).

Each transformer block is one FSDP unit (its parameters are gathered just before it runs and
freed after), then the root takes what is left (embeddings, final norm, head).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from apt.core.config.distributed import DistributedConfig, FSDPOptions
from apt.core.errors import DistributedError
from apt.trainops.distributed.env import DistEnv
from apt.trainops.distributed.strategies.base import Strategy, compile_arguments, unwrap_model

__all__ = ["FSDPStrategy", "apply_fsdp", "mixed_precision_policy", "transformer_blocks"]

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BLOCK_NAMES = ("blocks", "layers")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one.

    The model's ``blocks`` or ``layers`` ModuleList if it has one, else the entries of every
    ModuleList that is a direct child, else any ModuleList named ``blocks``/``layers`` deeper
    down (a model that keeps its blocks in ``model.decoder.layers``).
    """
    for name in _BLOCK_NAMES:
        found = getattr(model, name, None)
        if isinstance(found, nn.ModuleList):
            return list(found)
    direct = [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]
    if direct:
        return direct
    return [
        m
        for name, sub in model.named_modules()
        if isinstance(sub, nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_NAMES
        for m in sub
    ]


def mixed_precision_policy(opts: FSDPOptions, precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy from ``training.distributed.fsdp`` (``param_dtype`` defaults to
    ``training.precision``)."""
    param = _DTYPES[opts.param_dtype or precision]
    return MixedPrecisionPolicy(
        param_dtype=None if param == torch.float32 else param,
        reduce_dtype=_DTYPES[opts.reduce_dtype],
    )


def apply_fsdp(
    model: nn.Module,
    opts: FSDPOptions,
    *,
    dp_mesh: DeviceMesh,
    mp: MixedPrecisionPolicy,
    blocks: list[nn.Module] | None = None,
) -> nn.Module:
    """Shard ``model`` over ``dp_mesh`` (the ``dp_shard`` sub-mesh): each transformer block
    (``blocks``, default :func:`transformer_blocks`) one FSDP unit, then the root (in place;
    returns ``model``)."""
    offload = CPUOffloadPolicy() if opts.cpu_offload else OffloadPolicy()
    blocks = transformer_blocks(model) if blocks is None else blocks
    if not blocks:
        log.warning(
            "fsdp: %s has no blocks/layers ModuleList; sharding it as one unit",
            type(model).__name__,
        )
    # Parameters are moved to the device shard by shard, so the full model never has to
    # fit on one GPU.
    for block in blocks:
        fully_shard(
            block,
            mesh=dp_mesh,
            reshard_after_forward=opts.reshard_after_forward,
            mp_policy=mp,
            offload_policy=offload,
        )
    # The root's parameters (embedding, head) are needed again right at the start of
    # backward, so the root keeps them gathered (what torchtitan does too).
    fully_shard(
        model, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload
    )
    return model


class FSDPStrategy(Strategy):
    """FSDP2 with ``training.distributed.fsdp`` options.

    ``param_dtype`` (default: ``training.precision``) is the dtype parameters are gathered and
    computed in; ``reduce_dtype`` the dtype gradients are reduce-scattered in. The sharded master
    weights and the optimizer state stay in fp32.
    """

    name = "fsdp"

    def __init__(self, cfg: DistributedConfig, *, env: DistEnv, **kwargs: Any) -> None:
        super().__init__(cfg, env=env, **kwargs)
        self.sharded = dist.is_available() and dist.is_initialized()
        if cfg.fsdp.cpu_offload and env.device.type != "cuda":
            raise DistributedError(
                f"rank {env.rank}: training.distributed.fsdp.cpu_offload needs CUDA devices "
                f"(this rank computes on {env.device}, where parameters already live in CPU "
                "memory). Set fsdp.cpu_offload=false."
            )

    def _mp_policy(self) -> MixedPrecisionPolicy:
        return mixed_precision_policy(self.cfg.fsdp, self.precision)

    def apply(self, model: nn.Module) -> nn.Module:
        if not self.sharded:
            log.warning("strategy fsdp in a single process without a process group: not sharded")
            return model.to(self.env.device)
        assert self.mesh is not None  # built by build_strategy inside a process group
        return apply_fsdp(model, self.cfg.fsdp, dp_mesh=self.mesh["dp_shard"], mp=self._mp_policy())

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        root = unwrap_model(model)
        if not isinstance(root, FSDPModule):
            yield
            return
        # Micro-batches before the last neither reduce-scatter gradients nor free the gathered
        # parameters after backward, so a step of k micro-batches gathers once, not k times.
        root.set_requires_gradient_sync(False)
        root.set_reshard_after_backward(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)
            root.set_reshard_after_backward(True)

    def compile(
        self, model: nn.Module, mode: str = "default", options: dict[str, Any] | None = None
    ) -> nn.Module:
        """Compile each transformer block in place (FSDP's hooks stay between the compiled
        regions, and parameter names keep no ``_orig_mod.`` prefix)."""
        blocks = transformer_blocks(unwrap_model(model))
        if not blocks:
            return super().compile(model, mode, options)
        arguments = compile_arguments(mode, options)
        for block in blocks:
            block.compile(**arguments)
        return model
