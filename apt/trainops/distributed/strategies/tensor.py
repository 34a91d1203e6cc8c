"""``tensor``: every layer the model's plan names is split over the ``tp`` ranks (DTensor).

All ``tp`` ranks read the same batch (one data-parallel rank) and each computes its share of
every split layer: its attention heads, its slice of the MLP width, its part of the
vocabulary. The embedding and the (tied) output head are split along the vocabulary, and the
cross-entropy runs on the vocabulary shards (``loss_parallel``): the (B, T, V) logits are never
gathered in training. What the model returns is made plain again (the loss, and the logits
when a caller asks for them), so the loop, the task and the evaluator see ordinary tensors.

``sequence`` is the same with sequence parallelism on (``training.distributed.
sequence_parallel``): between the split regions each tp rank holds T / tp positions, so the
norms' activations and the residual stream take 1 / tp of the memory, and each block's two
all-reduces become an all-gather and a reduce-scatter each (the same bytes on the wire).
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

from apt.core.config.distributed import DistributedConfig
from apt.core.errors import DistributedError
from apt.trainops.distributed.env import DistEnv
from apt.trainops.distributed.strategies.base import Strategy
from apt.trainops.distributed.tensor_parallel import apply_tp

__all__ = ["SequenceStrategy", "TensorStrategy", "clip_grad_norm_by_layout_"]

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """A DTensor as the plain tensor it stands for (differentiably): a replicated one as its
    local copy, a sharded one gathered."""
    if not isinstance(value, DTensor):
        return value
    if all(p.is_replicate() for p in value.placements):
        return value.to_local()
    return value.full_tensor()


def clip_grad_norm_by_layout_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to a global 2-norm of ``max_norm``; return the norm.

    They are measured in groups of one layout (whole tensors; DTensors of one mesh and
    placements: split, replicated, partial sums of sequence shards, FSDP's 2-D shards, expert
    shards), since torch's norm kernels take one layout at once.
    """
    groups: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        grad = p.grad
        layout = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(layout, []).append(p)
    norms = [
        _plain(torch.nn.utils.get_total_norm([p.grad for p in group])).reshape(())  # type: ignore[misc]
        for group in groups.values()
    ]
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in groups.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


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
        self.split_tensors(model)
        return model

    def split_tensors(self, model: nn.Module) -> None:
        """Split ``model`` over the ``tp`` sub-mesh (sequence parallel when configured) and
        hook its forward: loss_parallel outside a training step, plain outputs."""
        assert self.mesh is not None
        sequence = self.cfg.sequence_sharded
        self._loss_parallel = apply_tp(model, tp_mesh=self.mesh["tp"], sequence=sequence)
        if sequence:
            model.register_forward_pre_hook(self._check_length, with_kwargs=True)
        # An evaluation's forward (no train_context around it) gets loss_parallel for itself.
        model.register_forward_pre_hook(self._enter_forward)
        model.register_forward_hook(self._leave_forward, always_call=True)

    def _check_length(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        tp = self.dims.tp
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] % tp:
            raise DistributedError(
                f"rank {self.env.rank}: sequence parallelism splits the positions over tp {tp} "
                f"ranks, and this batch has {ids.shape[1]} (not divisible by {tp}); give "
                f"sequences whose length is a multiple of {tp} (data.seq_len)."
            )

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
        """The base contract, gradients measured by layout (:func:`clip_grad_norm_by_layout_`)."""
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        return clip_grad_norm_by_layout_(params, max_norm)


class SequenceStrategy(TensorStrategy):
    """Tensor parallelism with sequence parallelism (``strategy: sequence``; the plan's
    :class:`~apt.model.architectures.sharding.SequencePlan`)."""

    name = "sequence"
