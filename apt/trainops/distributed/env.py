"""The process group: read the launcher's environment once, start c10d, describe this rank.

``torchrun`` (or ``python -m torch.distributed.run``) starts one process per rank and tells each
one who it is through environment variables. :func:`read_launcher_env` is the only place in APT
that reads them; :func:`setup_distributed` turns them into a started process group and a frozen
:class:`DistEnv` that every other component receives instead of looking at the environment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from apt.core.config.devices import check_device_present
from apt.core.errors import DistributedError

__all__ = [
    "DistEnv",
    "LauncherEnv",
    "check_world_size",
    "exit_process",
    "group_rank",
    "group_world_size",
    "in_process_group",
    "read_launcher_env",
    "setup_distributed",
    "teardown_distributed",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
#: ``python -m apt launch`` sets it for its workers: torchrun's static rendezvous.
STATIC_RENDEZVOUS_ENV = "APT_STATIC_RENDEZVOUS"


def in_process_group() -> bool:
    """True when this process belongs to a started ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def group_rank() -> int:
    """This process's rank in the running process group (0 outside one)."""
    return dist.get_rank() if in_process_group() else 0


def group_world_size() -> int:
    """Processes in the running process group (1 outside one)."""
    return dist.get_world_size() if in_process_group() else 1


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the run.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        local_rank: rank on this node (picks the GPU).
        world_size: number of processes in the run (1 when not distributed).
        device: where this rank computes (``cuda:<local_rank>`` or ``cpu``).
        backend: the c10d backend (``gloo``/``nccl``), None for a single process.
        local_world_size: processes of the run on this machine (they share its CPUs).
        is_main: rank 0, the one that logs and writes shared files.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None
    local_world_size: int = 1
    is_main: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_main", self.rank == 0)

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> DistEnv:
        """The environment of a plain, non-distributed process."""
        return cls(rank=0, local_rank=0, world_size=1, device=torch.device(device), backend=None)


@dataclass(frozen=True)
class LauncherEnv:
    """What the launcher told this process (``RANK``, ``WORLD_SIZE``, ...), unvalidated."""

    rank: str | None
    local_rank: str | None
    world_size: str | None
    master_addr: str | None
    master_port: str | None
    local_world_size: str | None = None
    restart_count: str | None = None  # TORCHELASTIC_RESTART_COUNT
    agent_store: bool = False  # the workers share the launcher's TCPStore
    nodes: str | None = None  # GROUP_WORLD_SIZE: torchrun agents (nodes) in the job
    static_rendezvous: bool = False  # set by ``python -m apt launch``

    def attempt_namespace(self) -> str | None:
        """A store namespace for this restart of the job, or None when not needed/known.

        torchrun's static rendezvous (``--master-addr/--master-port``) hands the workers of
        every restart the same TCPStore, so the keys of the previous attempt are still there:
        a peer that reads one (a dead rank's gloo address, a stale NCCL id) fails to connect.
        The restart count tells attempts apart; it is the same on every rank when one agent
        runs the whole job or when every agent restarts together (static rendezvous).
        """
        if self.restart_count is None or not self.agent_store:
            return None
        if self.nodes not in (None, "1") and not self.static_rendezvous:
            return None  # elastic membership changes can give agents different counts
        return f"apt/attempt-{self.restart_count}"


def read_launcher_env(environ: Mapping[str, str] | None = None) -> LauncherEnv:
    """Read the torchrun variables. The only function in APT that looks at them.

    Args:
        environ: the mapping to read (default: ``os.environ``); tests pass their own.
    """
    env = os.environ if environ is None else environ
    return LauncherEnv(
        rank=env.get("RANK"),
        local_rank=env.get("LOCAL_RANK"),
        world_size=env.get("WORLD_SIZE"),
        master_addr=env.get("MASTER_ADDR"),
        master_port=env.get("MASTER_PORT"),
        local_world_size=env.get("LOCAL_WORLD_SIZE"),
        restart_count=env.get("TORCHELASTIC_RESTART_COUNT"),
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        nodes=env.get("GROUP_WORLD_SIZE"),
        static_rendezvous=env.get(STATIC_RENDEZVOUS_ENV) == "1",
    )


def _as_int(name: str, value: str | None, rank_hint: str) -> int:
    if value is None:
        raise DistributedError(
            f"{rank_hint}: WORLD_SIZE is set but {name} is missing. Start the run with "
            f"`torchrun --nproc-per-node N ...`, which sets RANK, LOCAL_RANK, WORLD_SIZE, "
            f"MASTER_ADDR and MASTER_PORT, or set {name} yourself."
        )
    try:
        return int(value)
    except ValueError:
        raise DistributedError(
            f"{rank_hint}: {name}={value!r} is not an integer; fix the launcher's environment."
        ) from None


def _validate(launch: LauncherEnv) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) of a multi-process launch, or a DistributedError."""
    hint = f"rank {launch.rank if launch.rank is not None else '?'}"
    world = _as_int("WORLD_SIZE", launch.world_size, hint)
    rank = _as_int("RANK", launch.rank, hint)
    local_rank = _as_int("LOCAL_RANK", launch.local_rank, hint)
    for name, value in (("MASTER_ADDR", launch.master_addr), ("MASTER_PORT", launch.master_port)):
        if not value:
            raise DistributedError(
                f"rank {rank}: WORLD_SIZE={world} but {name} is missing, so the ranks cannot "
                f"find each other. Launch with torchrun (it sets {name}), or export {name} "
                "(the address/port of rank 0's node) on every node."
            )
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank}: RANK must be in [0, {world}) (WORLD_SIZE={world}).")
    if local_rank < 0:
        raise DistributedError(f"rank {rank}: LOCAL_RANK={local_rank} must be >= 0.")
    return rank, local_rank, world


def _resolve_backend(backend: str | None, device: str, rank: int) -> str:
    """auto -> nccl when this rank computes on CUDA, gloo otherwise."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise DistributedError(
            f"rank {rank}: unknown backend {backend!r}; use one of {', '.join(BACKENDS)}."
        )
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        return "nccl" if wants_cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedError(
            f"rank {rank}: backend 'nccl' needs CUDA, which this process does not see. "
            "Set training.distributed.backend: gloo (or auto) to train on CPU."
        )
    return backend


def _rank_device(backend: str, device: str, local_rank: int, rank: int) -> torch.device:
    if backend == "gloo" and not device.startswith("cuda"):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"rank {rank}: LOCAL_RANK={local_rank} but this node has {count} CUDA device(s). "
            f"Start at most {count} processes per node (--nproc-per-node {count})."
        )
    if ":" in device:
        raise DistributedError(
            f"rank {rank}: device {device!r} pins every rank to one GPU; use device: cuda (or "
            "auto) and each rank takes cuda:LOCAL_RANK."
        )
    return torch.device("cuda", local_rank)


def _single_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device_present(
        device,
        cuda_devices=torch.cuda.device_count(),
        mps_available=torch.backends.mps.is_available(),
    )
    return torch.device(device)


def setup_distributed(
    backend: str | None = None,
    *,
    timeout_seconds: int = 600,
    expected_world_size: int | None = None,
    device: str = "auto",
) -> DistEnv:
    """Start the process group described by the launcher, once; describe this rank.

    Without ``WORLD_SIZE`` nothing is started and a single-process :class:`DistEnv` comes
    back. A launcher's world of one (``WORLD_SIZE=1`` with ``MASTER_ADDR``, as torchrun sets
    them) is still a process group, so ``DDPWrapper`` and collectives work in it. Calling it
    again returns the running group's environment.

    Args:
        backend: ``gloo``, ``nccl``, or None/``"auto"``: nccl on CUDA, gloo on CPU.
        timeout_seconds: collective timeout; a rank whose peer died or hangs fails after this
            long instead of waiting forever.
        expected_world_size: the configured ``training.distributed.world_size``, if any; a
            mismatch with the launcher's ``WORLD_SIZE`` is an error.
        device: ``auto``, ``cpu``, ``cuda`` (rank i takes ``cuda:LOCAL_RANK``) or ``cuda:N``
            (single process only).

    Returns:
        The frozen :class:`DistEnv` of this process.

    Raises:
        DistributedError: the launcher's variables are incomplete or inconsistent, the backend
            cannot run here, or the world size differs from ``expected_world_size``.
    """
    launch = read_launcher_env()
    alone = launch.world_size is not None and launch.world_size.strip() == "1"
    if launch.world_size is None or (alone and not launch.master_addr):
        check_world_size(expected_world_size, 1)
        if in_process_group():
            return _env_of_running_group(backend, local_rank=0, device=device)
        return DistEnv.single(_single_device(device))
    rank, local_rank, world = _validate(launch)
    check_world_size(expected_world_size, world, rank=rank)
    if dist.is_initialized():
        return _env_of_running_group(backend, local_rank=local_rank, device=device)
    resolved = _resolve_backend(backend, device, rank)
    rank_device = _rank_device(resolved, device, local_rank, rank)
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
    timeout = timedelta(seconds=timeout_seconds)
    store = _attempt_store(launch, rank, world, timeout)
    dist.init_process_group(
        # With NCCL, CPU tensors (FSDP CPU offload, small control collectives) still need a
        # backend: gloo serves them in the same process group.
        backend="cpu:gloo,cuda:nccl" if resolved == "nccl" else resolved,
        timeout=timeout,
        device_id=rank_device if resolved == "nccl" else None,
        store=store,
        rank=rank if store is not None else -1,
        world_size=world if store is not None else -1,
    )
    if dist.get_world_size() != world or dist.get_rank() != rank:  # pragma: no cover
        raise DistributedError(
            f"rank {rank}: the process group has rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, the launcher said {rank} of {world}."
        )
    if rank == 0:
        log.info(
            "distributed: %d processes, backend %s, timeout %ds", world, resolved, timeout_seconds
        )
    local_world = launch.local_world_size or ""
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        device=rank_device,
        backend=resolved,
        local_world_size=int(local_world) if local_world.isdigit() else 1,
    )


def _env_of_running_group(backend: str | None, *, local_rank: int, device: str) -> DistEnv:
    """The DistEnv of a process group somebody (maybe us) already started."""
    running = str(dist.get_backend())
    rank = dist.get_rank()
    if backend not in (None, "auto") and backend not in running:
        raise DistributedError(
            f"rank {rank}: the process group already runs backend {running!r}, not {backend!r}. "
            "Call teardown_distributed() first, or ask for the running backend."
        )
    if "nccl" in running and device != "cpu":
        rank_device = torch.device("cuda", torch.cuda.current_device())
    elif device.startswith("cuda"):
        rank_device = torch.device("cuda", local_rank)
    else:
        rank_device = torch.device("cpu")
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=rank_device,
        backend=running,
    )


def _attempt_store(
    launch: LauncherEnv, rank: int, world: int, timeout: timedelta
) -> dist.Store | None:
    """The launcher's store seen through this restart's namespace (see
    :meth:`LauncherEnv.attempt_namespace`); None when the launcher's own store will do."""
    namespace = launch.attempt_namespace()
    if namespace is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    return dist.PrefixStore(namespace, store)


def check_world_size(expected: int | None, actual: int, *, rank: int = 0) -> None:
    """Fail when the configured world size is not the launcher's.

    Raises:
        DistributedError: naming both numbers and the two ways to agree.
    """
    if expected is not None and expected != actual:
        raise DistributedError(
            f"rank {rank}: training.distributed.world_size is {expected} but the launcher "
            f"started {actual} process(es). Launch {expected} processes (torchrun "
            f"--nnodes ... --nproc-per-node ...), or set training.distributed.world_size="
            f"{actual} (or remove it)."
        )


def exit_process(code: int) -> NoReturn:
    """End a distributed process with ``code`` now: flush what it printed and logged, and skip
    the interpreter's finalization (call :func:`teardown_distributed` first when the peers are
    alive).

    torch's gloo backend can abort a process in finalization, after a clean
    ``destroy_process_group()`` even ("terminate called without an active exception", exit -6,
    seen here about once in 30 two-rank runs; pytorch/pytorch#190489, #179291): its worker
    threads can still hold work objects with Python references. Every file of the run is closed
    before this is called; nothing else needs to run.
    """
    for handler in logging.getLogger().handlers + logging.getLogger("apt").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def teardown_distributed() -> None:
    """Destroy the process group if one runs; safe to call more than once."""
    if in_process_group():
        dist.destroy_process_group()
