"""Expert parallelism: the experts of every MoE layer split over the ``ep`` ranks, tokens sent
to the rank that holds their expert with all-to-all collectives.

The model declares its experts as :class:`~apt.model.layers.moe.Experts` modules (stacked
weights, the expert first) and hands them a static-shaped (E, C, D) batch: C slots of each of
the E experts. So dispatch needs no size exchange::

    this rank's (E, C, D) --all-to-all--> (ep, E/ep, C, D): every rank's slots of my experts
        -> my E/ep experts on (E/ep, ep*C, D) --all-to-all back--> (E, C, D)

Each rank keeps routing, capacity and the load-balancing loss of its own tokens, as under DDP.
The expert weights become DTensors sharded along the expert dimension (``Shard(0)`` over the
``ep`` mesh), so DCP writes each rank's experts and reshards a checkpoint into any layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from apt.core.errors import ConfigError
from apt.model.layers.moe import Experts

__all__ = ["ShardedExperts", "apply_ep", "expert_parameter_names"]

_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


class ShardedExperts(nn.Module):
    """The experts of one MoE layer, this rank holding ``E / ep`` of them (DTensor weights
    under the same names as :class:`Experts`'s); ``forward`` takes and returns the layer's whole
    (E, C, D) batch, like the module it replaces.

    Args:
        experts: the layer's experts, the same full weights on every rank.
        mesh: the one-dimensional ``ep`` mesh.
    """

    def __init__(self, experts: Experts, mesh: DeviceMesh) -> None:
        super().__init__()
        self.mesh = mesh
        self.ep = mesh.size()
        self.num_experts = experts.gate_proj.shape[0]
        for name in _WEIGHTS:
            full = getattr(experts, name)
            shard = distribute_tensor(full.detach(), mesh, [Shard(0)])  # this rank's experts
            setattr(self, name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, C, D) -> (E, C, D)
        E, C, D = x.shape
        local = E // self.ep
        group = self.mesh.get_group()
        # Every rank's slot count C_i (equal for fixed-shape batches; evaluation and unpacked
        # sft batches may differ): one tiny all-gather, so the exchange sizes agree.
        counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.ep)]
        dist.all_gather(counts, torch.tensor([C], device=x.device), group=group)
        slots = [int(c) for c in counts]
        # Slots of experts j*local .. (j+1)*local - 1 go to rank j; rank i's arrive as the
        # i-th block, (local, C_i, D).
        sent = [local * C] * self.ep
        got = [local * c for c in slots]
        received = _exchange(x.reshape(E * C, D), got, sent, group)  # (local * sum C_i, D)
        blocks = [b.view(local, c, D) for b, c in zip(received.split(got), slots, strict=True)]
        tokens = torch.cat(blocks, dim=1)  # (local, sum C_i, D)
        # The loop scales each rank's loss for data-parallel averaging; these gradients arrive
        # summed over the ranks through the all-to-all instead: divided by ep on the way in.
        gate, up, down = (_GradScale.apply(_local(getattr(self, n)), 1 / self.ep) for n in _WEIGHTS)
        h = F.silu(torch.bmm(tokens, gate)) * torch.bmm(tokens, up)  # (local, sum C_i, F)
        y = torch.bmm(h, down)  # (local, sum C_i, D)
        pieces = zip(y.split(slots, dim=1), slots, strict=True)
        back = torch.cat([b.reshape(local * c, D) for b, c in pieces])  # (local * sum C_i, D)
        out = _exchange(back, sent, got, group)  # (E * C, D)
        return out.view(E, C, D)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, per_rank={self.num_experts // self.ep}"


def _exchange(
    rows: torch.Tensor, output_sizes: list[int], input_sizes: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """All-to-all of ``rows`` (sizes in rows of dim 0), differentiable (the backward sends the
    gradients back the same way)."""
    out = all_to_all_single_autograd(rows.contiguous(), output_sizes, input_sizes, group)
    return wait_tensor(out)


class _GradScale(torch.autograd.Function):
    """The identity forward; the gradient times ``scale`` backward. (Inside the forward, so
    it holds whatever later replaces the parameter objects, as a checkpoint load may.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's block of a sharded weight, differentiably (the gradient becomes the
    DTensor's)."""
    return param.to_local() if isinstance(param, DTensor) else param


def apply_ep(model: nn.Module, *, ep_mesh: DeviceMesh) -> list[str]:
    """Replace every :class:`Experts` of ``model`` by :class:`ShardedExperts` over ``ep_mesh``,
    in place; return the names of the replaced modules.

    The loop scales each rank's loss for data-parallel averaging (DDP divides the summed
    gradients by the ranks); an expert's gradient arrives already summed over the ranks through
    the all-to-all, so it is divided by ``ep`` on its way in.

    Raises:
        ConfigError: the model has no experts, or their number is not divisible by ``ep``.
    """
    ep = ep_mesh.size()
    found = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    if not found:
        raise ConfigError(
            "training.distributed.strategy expert: the model has no MoE experts to split. To "
            "fix: set model.moe (enabled: true), or use strategy ddp or fsdp."
        )
    off = [
        n for n in found if not getattr(model.get_submodule(n.rpartition(".")[0]), "enabled", True)
    ]
    if off:
        raise ConfigError(
            f"training.distributed.strategy expert: the MoE layer {off[0].rpartition('.')[0]} is "
            "off; switching it on later copies the dense weights into experts that are split "
            "over the ranks, which expert parallelism does not do. To fix: set "
            "model.moe.enabled: true (no schedule switching MoE on), or use strategy ddp."
        )
    counts = {m.gate_proj.shape[0] for m in found.values()}
    uneven = sorted(n for n in counts if n % ep)
    if uneven:
        raise ConfigError(
            f"training.distributed: expert parallelism over ep {ep} splits the experts, but "
            f"model.moe.num_experts {uneven[0]} is not divisible by {ep}. Choose a number of "
            f"experts divisible by {ep}, or another ep."
        )
    for name, experts in found.items():
        sharded = ShardedExperts(experts, ep_mesh)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, sharded)
    return sorted(found)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the sharded expert parameters (those data-parallel averaging must leave
    alone)."""
    return [
        f"{name}.{weight}"
        for name, module in model.named_modules()
        if isinstance(module, ShardedExperts)
        for weight in _WEIGHTS
    ]
