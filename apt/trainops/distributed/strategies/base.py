"""The ``Strategy`` contract, its registry and :func:`build_strategy`.

A strategy is everything that differs between running on one process, replicated (DDP) and
sharded (FSDP2): how the model is wrapped, how gradient sync is skipped during accumulation, how
the gradient norm is measured, how state is gathered and saved, and what the sampler needs.
The training loop talks to this interface only, so it holds no ``if fsdp:`` branch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from apt.core.config.distributed import DistributedConfig
from apt.core.errors import ConfigError, DistributedError
from apt.core.registry import Registry
from apt.trainops.distributed.dtensor import is_dtensor
from apt.trainops.distributed.env import DistEnv, check_world_size, in_process_group
from apt.trainops.distributed.mesh import ParallelDims
from apt.trainops.distributed.state_dicts import (
    StateDict,
    gather_full_state,
    load_full_state,
    load_sharded_state,
    sharded_state,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["STRATEGIES", "MicroBatches", "Strategy", "build_strategy", "unwrap_model"]

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


def compile_arguments(mode: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``torch.compile``'s keywords for a mode and inductor options: torch takes one or the
    other, so options come on top of the mode's own (``torch._inductor.list_mode_options``).

    Raises:
        ConfigError: an option inductor does not have, named with the fix.
    """
    if not options:
        return {"mode": mode}
    import torch._inductor

    known = set(torch._inductor.list_options())
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"training.compile_options: {', '.join(unknown)} is not an inductor option of torch "
            f"{torch.__version__}; see python -c 'import torch._inductor as i; "
            "print(i.list_options())', or remove it."
        )
    return {"options": {**torch._inductor.list_mode_options(mode), **options}}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and ``torch.compile`` wrappers (in any nesting order).

    FSDP2 does not wrap: ``fully_shard`` changes the module's class in place, so a sharded
    model is already the user's module.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


class MicroBatches(Protocol):
    """One optimizer step's micro-batches, as the training loop hands them to
    :meth:`Strategy.forward_backward`; the methods fire the loop's events around the work.

    Attributes:
        batches: the step's micro-batches as the loader gave them (on the CPU).
        counts: the targets of each (``task.count_targets``).
        scale: the weight of one target: data-parallel ranks / targets of the step summed over
            them, so ``mean loss x count x scale``, backpropagated and averaged over the
            data-parallel ranks, is the gradient of the mean over every target of the step.
    """

    batches: Sequence[Any]
    counts: Sequence[int]
    scale: float

    def begin(self, i: int) -> Any:
        """Fire ``batch_start`` of micro-batch ``i``; return it on the device."""
        ...

    def forward(self, batch: Any) -> torch.Tensor:
        """The task's training forward of ``batch`` under autocast: its mean loss."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (through the gradient scaler) between the
        ``before_backward`` and ``after_backward`` events."""
        ...

    def backward_events(self) -> contextlib.AbstractContextManager[None]:
        """``before_backward`` on entry, ``after_backward`` on exit: around work that a
        strategy backpropagates itself."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's mixed-precision context."""
        ...

    def token_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` (B, T) each of a language-model batch, for a strategy that
        computes the cross-entropy itself (``task.token_targets``)."""
        ...

    def end(self, loss: torch.Tensor) -> None:
        """Record the mean loss of the micro-batch begun last and fire ``batch_end``."""
        ...


class Strategy:
    """How a model is spread over the processes of a run.

    Args:
        cfg: the ``training.distributed`` section.
        env: this process's :class:`DistEnv` (from :func:`setup_distributed`).
        precision: ``training.precision``, the compute dtype FSDP gathers parameters in when
            ``fsdp.param_dtype`` is not set.
        dims: the parallel degrees (default: every one 1, or the world size for the strategy's
            own dimension).
        mesh: the run's DeviceMesh over ``dims`` (None outside a process group); each
            strategy applies itself on its sub-mesh (``mesh["tp"]``, ``mesh["dp_shard"]``).

    Attributes:
        name: the registry name (``single``, ``ddp``, ``fsdp``, ``tensor``, ``pipeline``).
        sharded: no rank holds the whole model (FSDP or tensor parallel: DTensor shards;
            pipeline: each rank its stages), so a full state needs a gather, and checkpoints
            are written shard by shard
            with DCP.
        holds_part: this rank's model has only some of the whole model's tensors (pipeline
            stages; DTensor shards still name every tensor), so it loads a whole state in part.
    """

    name: ClassVar[str] = ""
    sharded: bool = False
    holds_part: bool = False

    def __init__(
        self,
        cfg: DistributedConfig,
        *,
        env: DistEnv,
        precision: str = "fp32",
        dims: ParallelDims | None = None,
        mesh: DeviceMesh | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise DistributedError(f"unknown precision {precision!r}; use one of {PRECISIONS}.")
        self.cfg = cfg
        self.env = env
        self.precision = precision
        self.dims = dims or ParallelDims.resolve(cfg, world_size=env.world_size)
        self.mesh = mesh

    def apply(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to this rank's device and wrap/shard it; use the result for training."""
        return model.to(self.env.device)

    def compile(
        self, model: nn.Module, mode: str = "default", options: dict[str, Any] | None = None
    ) -> nn.Module:
        """``torch.compile`` the wrapped model (``training.compile``, ``mode``:
        ``training.compile_mode``, ``options``: ``training.compile_options``); returns what to
        train."""
        return torch.compile(model, **compile_arguments(mode, options))  # type: ignore[return-value]

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's module (no DDP, no ``torch.compile`` wrapper)."""
        return unwrap_model(model)

    @contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Skip gradient sync inside the block (all micro-batches of a step but the last)."""
        yield

    def forward_backward(self, model: nn.Module, step: MicroBatches) -> torch.Tensor:
        """Forward and backward every micro-batch of one optimizer step; return the sum over
        them of mean loss x target count (float32, on the device).

        The default runs the micro-batches one after the other, gradient sync skipped
        (:meth:`no_sync`) but for the last. A pipeline strategy overrides it: its schedule
        runs all micro-batches of the step at once.
        """
        loss_sum = torch.zeros((), device=self.env.device, dtype=torch.float32)
        for i, count in enumerate(step.counts):
            batch = step.begin(i)
            last = i == len(step.counts) - 1
            sync = contextlib.nullcontext() if last else self.no_sync(model)
            with self.train_context(), sync:
                loss = step.forward(batch)
                step.backward(loss * (count * step.scale))
            loss = loss.detach()
            loss_sum += loss.float() * count
            step.end(loss)
        return loss_sum

    @contextmanager
    def train_context(self) -> Iterator[None]:
        """Around one micro-batch's forward and backward (tensor: the loss-parallel
        cross-entropy, whose backward must run inside it too)."""
        yield

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global 2-norm is at most ``max_norm``; return the norm.

        The norm is over the whole model even when gradients are sharded (DTensor): each rank's
        partial norm is reduced across ranks before clipping. ``max_norm=inf`` only measures.
        The norm is a 0-d tensor on the gradients' device, as torch's ``clip_grad_norm_``
        returns it: reading it (``float(norm)``) waits for the device, so the loop does not.
        """
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)  # type: ignore[arg-type]
        if is_dtensor(total):
            total = total.full_tensor()  # type: ignore[attr-defined]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def full_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[StateDict, StateDict]:
        """Full CPU model and optimizer states on rank 0 (``{}`` elsewhere). Collective."""
        return gather_full_state(model, optimizer)

    def load_full_state_dict(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        model_sd: StateDict | None,
        optim_sd: StateDict,
    ) -> None:
        """Load full states (on every rank, or on rank 0 only: then broadcast); ``model_sd=None``
        loads the optimizer alone. Collective."""
        load_full_state(model, optimizer, model_sd, optim_sd)

    def sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[StateDict, StateDict]:
        """This rank's model and optimizer state as DCP writes it (DTensor shards when
        sharded); the live tensors, keyed by parameter name."""
        return sharded_state(model, optimizer)

    def load_sharded_state_dict(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        model_sd: StateDict | None,
        optim_sd: StateDict,
    ) -> None:
        """Put states shaped like :meth:`sharded_state_dict`'s (filled in place by a DCP load)
        into the model and optimizer; ``model_sd=None`` leaves the weights alone."""
        load_sharded_state(model, optimizer, model_sd, optim_sd)

    def sampler_rank_world(self) -> tuple[int, int]:
        """(this rank's data shard, number of data shards) for the sampler: the data-parallel
        rank and size (every tensor-parallel rank of one data-parallel rank reads the same)."""
        return self.dims.dp_rank(self.env.rank), self.dims.dp_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.env.rank}, world_size={self.env.world_size}, "
            f"device={self.env.device})"
        )


#: Strategies by ``training.distributed.strategy``; FSDP and tensor (and the DTensor machinery
#: they need) are imported only by a run that chooses them.
STRATEGIES: Registry[type[Strategy]] = Registry(
    "strategy",
    lazy={
        "fsdp": "apt.trainops.distributed.strategies.fsdp:FSDPStrategy",
        "tensor": "apt.trainops.distributed.strategies.tensor:TensorStrategy",
        "sequence": "apt.trainops.distributed.strategies.tensor:SequenceStrategy",
        "hybrid": "apt.trainops.distributed.strategies.hybrid:HybridStrategy",
        "pipeline": "apt.trainops.distributed.strategies.pipeline:PipelineStrategy",
        "expert": "apt.trainops.distributed.strategies.expert:ExpertStrategy",
    },
)


def build_strategy(cfg: DistributedConfig, *, env: DistEnv, precision: str = "fp32") -> Strategy:
    """The strategy ``cfg.strategy`` names, checked against how the run was launched, with
    the run's one DeviceMesh (built here, inside a process group).

    Raises:
        ConfigError: the strategy name is not registered (lists the valid names), or the
            degrees do not multiply to the launcher's world size (shows the arithmetic).
        DistributedError: ``cfg.world_size`` differs from the launcher's, or ``single`` was
            launched on several processes.
    """
    STRATEGIES.get(cfg.strategy)  # an unknown name fails first, listing the valid ones
    check_world_size(cfg.world_size, env.world_size, rank=env.rank)
    if cfg.strategy == "single" and env.world_size > 1:
        raise DistributedError(
            f"rank {env.rank}: training.distributed.strategy is 'single' but the launcher "
            f"started {env.world_size} processes, which would train {env.world_size} unrelated "
            "copies. Set training.distributed.strategy=ddp (or fsdp, tensor), or launch one "
            "process."
        )
    dims = ParallelDims.resolve(cfg, world_size=env.world_size)
    # hybrid over pipeline stages (pp x dp_shard) is the pipeline strategy with FSDP2 inside
    # each stage; hybrid over tensor-parallel groups is a strategy of its own.
    cls = STRATEGIES.get("pipeline" if cfg.strategy == "hybrid" and dims.pp > 1 else cfg.strategy)
    mesh = None
    if cfg.strategy != "single" and in_process_group():
        mesh = dims.build_mesh(env.device.type)
        if env.is_main:
            log.info("device mesh: %s (%s)", dims, cfg.strategy)
    return cls(cfg, env=env, precision=precision, dims=dims, mesh=mesh)
