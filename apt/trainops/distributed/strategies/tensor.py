"""``tensor``: every layer the model's plan names is split over the ``tp`` ranks (DTensor).

All ``tp`` ranks read the same batch (one data-parallel rank) and each computes its share of
every split layer: its attention heads, its slice of the MLP width, its part of the
vocabulary. The embedding and the (tied) output head are split along the vocabulary, and the
cross-entropy runs on the vocabulary shards (``loss_parallel``): the (B, T, V) logits are never
gathered in training. What the model returns is made plain again (the loss, and the logits
when a caller asks for them), so the loop, the task and the evaluator see ordinary tensors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils import _pytree as pytree

from apt.core.config.training import DistributedConfig
from apt.trainops.distributed.env import DistEnv
from apt.trainops.distributed.strategies.base import Strategy
from apt.trainops.distributed.tensor_parallel import apply_tp

__all__ = ["TensorStrategy"]

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """A DTensor as the plain tensor it stands for (differentiably): a replicated one as its
    local copy, a sharded one gathered."""
    if not isinstance(value, DTensor):
        return value
    if all(p.is_replicate() for p in value.placements):
        return value.to_local()
    return value.full_tensor()


class TensorStrategy(Strategy):
    """Tensor parallelism (``torch.distributed.tensor.parallel``) over the ``tp`` sub-mesh,
    following the model's :class:`~apt.model.architectures.sharding.TensorPlan`.

    In a process without a process group the model is not split and the run is a single one.
    """

    name = "tensor"

    def __init__(self, cfg: DistributedConfig, *, env: DistEnv, **kwargs: Any) -> None:
        super().__init__(cfg, env=env, **kwargs)
        self.sharded = dist.is_available() and dist.is_initialized()
        self._loss_parallel = False  # the logits come out split along the vocabulary
        self._in_step = False  # inside train_context: the loop holds loss_parallel
        self._forward_context: contextlib.AbstractContextManager[None] | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        model = model.to(self.env.device)
        if not self.sharded:
            log.warning("strategy tensor in a single process without a process group: not split")
            return model
        assert self.mesh is not None  # built by build_strategy inside a process group
        self._loss_parallel = apply_tp(model, tp_mesh=self.mesh["tp"])
        # An evaluation's forward (no train_context around it) gets loss_parallel for itself.
        model.register_forward_pre_hook(self._enter_forward)
        model.register_forward_hook(self._leave_forward, always_call=True)
        return model

    def _enter_forward(self, module: nn.Module, args: Any) -> None:
        if self._loss_parallel and not self._in_step and self._forward_context is None:
            self._forward_context = loss_parallel()
            self._forward_context.__enter__()

    def _leave_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._forward_context is not None:
            context, self._forward_context = self._forward_context, None
            context.__exit__(None, None, None)
        return pytree.tree_map(_plain, output)

    @contextmanager
    def train_context(self) -> Iterator[None]:
        """The micro-batch's forward and backward under ``loss_parallel`` (its backward needs
        the context as much as its forward)."""
        if not self._loss_parallel:
            yield
            return
        self._in_step = True
        try:
            with loss_parallel():
                yield
        finally:
            self._in_step = False

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The base contract; split gradients (DTensor) and whole ones (norms, replicated on
        every tp rank) are measured apart, since torch's norm kernels take one kind at once."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        groups = [
            [p for p in params if isinstance(p.grad, DTensor)],
            [p for p in params if not isinstance(p.grad, DTensor)],
        ]
        norms = []
        for group in groups:
            if group:
                norm = torch.nn.utils.get_total_norm([p.grad for p in group])  # type: ignore[misc]
                norms.append(_plain(norm).reshape(()))
        total = torch.linalg.vector_norm(torch.stack(norms))
        for group in groups:
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total
