"""Small collectives for the training loop: barrier, mean of metrics, rank-0-only work.

Each one is a no-op in a single process, so the loop calls them without asking whether it runs
distributed. :func:`distributed_errors` turns the c10d errors a dead or hung peer causes into a
:class:`~apt.core.errors.DistributedError` that says what happened and what to do.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar, overload

import torch
import torch.distributed as dist

from apt.core.errors import DistributedError
from apt.trainops.distributed.env import group_rank, group_world_size

__all__ = [
    "RankSums",
    "SideChannel",
    "all_reduce_mean",
    "barrier",
    "distributed_errors",
    "is_main_process",
    "rank_zero_only",
]

P = ParamSpec("P")
R = TypeVar("R")


def _comm_device() -> torch.device:
    """Where tensors must live for the running backend's collectives."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not distributed."""
    return group_rank() == 0


def rank_zero_only(fn: Callable[P, R]) -> Callable[P, R | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks get None without calling it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if group_world_size() > 1:
        with distributed_errors("barrier"):
            if "nccl" in str(dist.get_backend()):
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()


class SideChannel:
    """A gloo group of every rank, for host-side collectives kept apart from training's.

    Two uses: an async checkpoint's barriers and DCP's coordination run in the writer thread,
    where on the training group they could interleave with the step's own collectives; and the
    loop's per-step host numbers (target counts, the stop flag), which over NCCL would make
    the host wait for the device every step. Give each use its own channel: collectives from
    two threads must not share a group.

    Collective to create: every rank builds it at the same point.

    Args:
        timeout_seconds: how long a barrier waits for a peer before failing.
        ranks: the global ranks of the channel (None: every rank). Every rank creates every
            channel, also those it is not part of (c10d's rule for new groups).
    """

    def __init__(self, timeout_seconds: float, *, ranks: list[int] | None = None) -> None:
        self.group = dist.new_group(
            ranks, backend="gloo", timeout=timedelta(seconds=timeout_seconds)
        )

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        with distributed_errors("a checkpoint barrier"):
            dist.barrier(group=self.group)

    def sum(self, value: float) -> float:
        """``value`` summed over every rank, on the host: it never waits for a device.

        c10d errors propagate as they are (wrap the caller in :func:`distributed_errors`).
        """
        return self.reduce(value, dist.ReduceOp.SUM)

    def reduce(self, value: float, op: Any) -> float:
        """``value`` reduced over every rank with ``op`` (a ``dist.ReduceOp``), on the host."""
        total = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(total, op=op, group=self.group)
        return float(total.item())

    def agree(self, ok: bool) -> bool:
        """A barrier that returns True when every rank passed ``ok=True``."""
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        with distributed_errors("a checkpoint barrier"):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())


class RankSums:
    """Sums over the ranks of a run, as the training loop and the evaluator need them.

    ``host`` sums a number on a gloo side channel, so it never waits for the device (target
    counts, the stop flag); ``device`` sums a tensor where it lives, on the training group (the
    loss). In a single process both return their input.

    The sums are over the data-parallel ranks; :meth:`any_rank` asks every rank of the run
    (under tensor parallelism the two differ).

    Args:
        world_size: data-parallel ranks taking part.
        side: the channel host sums use (None: the training group, or nothing in one process).
        group: the group device sums use (None: the training group).
        everyone: a channel of every rank, for :meth:`any_rank` (None: ``side``, the same
            ranks).
    """

    def __init__(
        self,
        world_size: int = 1,
        side: SideChannel | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        everyone: SideChannel | None = None,
    ) -> None:
        self.world_size = world_size
        self._side = side
        self._group = group
        self._everyone = everyone

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank of the run (a stop request)."""
        if self._everyone is not None:
            return self._everyone.reduce(float(flag), dist.ReduceOp.MAX) > 0
        return self.host(float(flag)) > 0

    def host(self, value: float) -> float:
        """``value`` summed over every rank (a float)."""
        return self._host(value, dist.ReduceOp.SUM)

    def host_max(self, value: float) -> float:
        """The largest ``value`` over every rank (a float)."""
        return self._host(value, dist.ReduceOp.MAX)

    def _host(self, value: float, op: Any) -> float:
        if self.world_size == 1:
            return value
        if self._side is not None:
            return self._side.reduce(value, op)
        total = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(total, op=op, group=self._group)
        return float(total.item())

    def device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank (a new tensor on its device)."""
        if self.world_size == 1:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self._group)
        return total


@overload
def all_reduce_mean(x: float) -> float: ...
@overload
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor: ...
@overload
def all_reduce_mean(x: dict[str, float]) -> dict[str, float]: ...


def all_reduce_mean(
    x: float | torch.Tensor | dict[str, float],
) -> float | torch.Tensor | dict[str, float]:
    """Mean of ``x`` over all ranks, of the same type as ``x``; ``x`` itself in one process.

    A dict must have the same keys on every rank (checked; the values are reduced in one
    collective, in float64). A tensor comes back on its own device, in its own floating dtype
    (integer tensors come back as float32).

    Raises:
        DistributedError: the dict keys differ between ranks, or a peer failed.
    """
    if group_world_size() == 1:
        return x.clone() if isinstance(x, torch.Tensor) else (dict(x) if isinstance(x, dict) else x)
    world = dist.get_world_size()
    device = _comm_device()
    if isinstance(x, torch.Tensor):
        dtype = x.dtype if x.is_floating_point() else torch.float32
        buf = x.detach().to(device=device, dtype=dtype, copy=True)
        with distributed_errors("all_reduce_mean"):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return (buf / world).to(x.device)
    if isinstance(x, dict):
        keys = sorted(x)
        _check_same_keys(keys, device)
        values = torch.tensor([float(x[k]) for k in keys], dtype=torch.float64, device=device)
        with distributed_errors("all_reduce_mean"):
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return dict(zip(keys, (values / world).tolist(), strict=True))
    value = torch.tensor([float(x)], dtype=torch.float64, device=device)
    with distributed_errors("all_reduce_mean"):
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return float(value.item() / world)


def _check_same_keys(keys: list[str], device: torch.device) -> None:
    """Every rank holds the same keys iff every rank's crc is both the max and the min."""
    crc = zlib.crc32("\0".join(keys).encode())
    probe = torch.tensor([crc, -crc], dtype=torch.int64, device=device)
    with distributed_errors("all_reduce_mean"):
        dist.all_reduce(probe, op=dist.ReduceOp.MAX)
    if probe.tolist() != [crc, -crc]:
        raise DistributedError(
            f"rank {group_rank()}: all_reduce_mean got different metric names on different ranks "
            f"(this rank: {', '.join(keys)}). Log the same metrics on every rank."
        )


# Words c10d backends use when a peer is gone or silent; a RuntimeError carrying one of them
# comes from a collective, not from the user's model.
_PEER_FAILURE_MARKERS = (
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "timed out",
    "timeout",
    "gloo",
    "nccl",
    "socket",
    "watchdog",
)


@contextmanager
def distributed_errors(what: str = "a collective") -> Iterator[None]:
    """Turn c10d failures inside the block into a :class:`DistributedError`.

    A rank whose peer died sees a closed connection (gloo) or a timeout; either way the run
    cannot go on. The new error names this rank, the operation and the fix. Wrap the training
    loop (or any block that runs collectives) with it.

    Args:
        what: the operation, for the message (``"training step 12"``).

    Raises:
        DistributedError: from the original c10d error.
    """
    try:
        yield
    except DistributedError:
        raise
    except (dist.DistError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, dist.DistError) and not any(
            marker in text.lower() for marker in _PEER_FAILURE_MARKERS
        ):
            raise
        world = group_world_size()
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise DistributedError(
            f"rank {group_rank()} of {world}: {what} failed because a peer rank stopped answering "
            f"({type(exc).__name__}: {first_line[:300]}). Another rank most likely crashed or was "
            "killed: its own error, and torchrun's summary of failed ranks, say why. Fix that "
            "rank's error and resume from the last checkpoint; if the ranks are only slow (a "
            "long save, a slow filesystem), raise training.distributed.timeout_seconds."
        ) from exc
