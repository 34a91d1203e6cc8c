"""``torch.distributed.checkpoint`` folders: each rank writes its own shard, any world size reads.

A DCP folder holds ``.metadata`` and one or more ``__<rank>_<i>.distcp`` files per rank. The
state written is what a strategy's ``sharded_state_dict`` returns, keyed by parameter name, so
DCP reshards on load: FSDP x2 resumes in one process or under DDP x4, and the reverse.

Loading never unpickles arbitrary objects: ``.metadata`` is read with an unpickler that accepts
only DCP's own metadata classes, and non-tensor values (optimizer hyper-parameters) with
``torch.load(weights_only=True)``; and it opens only regular files inside the DCP folder
(:mod:`~apt.trainops.checkpoints.safe_dcp`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from apt.core.errors import CheckpointError, DistributedError
from apt.trainops.checkpoints.fsio import lstat_inside
from apt.trainops.checkpoints.safe_dcp import (
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_storage_sizes,
    read_dcp_metadata,
    storage_files,
)
from apt.trainops.distributed import Strategy, group_rank, in_process_group

__all__ = [
    "load_dcp",
    "load_module_shards",
    "load_optimizer_shards",
    "read_dcp_into",
    "read_dcp_tensors",
    "save_dcp",
    "write_dcp",
]

StateDict = dict[str, Any]


def write_dcp(
    state: StateDict,
    folder: Path,
    *,
    process_group: dist.ProcessGroup | None = None,
    thread_count: int = 1,
) -> None:
    """``dcp.save`` of ``state`` into ``folder`` (each rank its shard; files fsynced).

    ``thread_count`` > 1: each rank writes that many files (``__<rank>_<i>.distcp``) in
    parallel threads.

    Raises:
        CheckpointError: any rank failed to write (names each rank's error).
    """
    try:
        with warnings.catch_warnings():
            # DCP warns that it assumes one process when no process group runs: intended.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a")
            dcp.save(
                state,
                storage_writer=FileSystemWriter(folder, thread_count=thread_count),
                process_group=process_group,
                no_dist=not in_process_group(),
            )
    except CheckpointException as exc:  # a BaseException: `except Exception` would miss it
        raise CheckpointError(
            f"rank {group_rank()}: writing {folder} failed ({_failures(exc)}). Check free space "
            "and that every rank can write there."
        ) from None


def read_dcp_into(
    state: StateDict,
    folder: Path,
    *,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool | None = None,
) -> None:
    """``dcp.load`` into ``state`` in place (each tensor receives its part of the saved one).

    Raises:
        CheckpointError: ``folder`` holds no DCP checkpoint, its metadata is not DCP's, or it
            does not hold the tensors ``state`` asks for.
        DistributedError: a peer failed during the load.
    """
    _require_metadata(folder)
    try:
        _drop_unsaved_optimizer_state(state, folder)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a")
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(folder),
                planner=SafeLoadPlanner(),
                process_group=process_group,
                no_dist=not in_process_group() if no_dist is None else no_dist,
            )
    except CheckpointException as exc:
        raise CheckpointError(
            f"rank {group_rank()}: cannot load {folder} into this model/optimizer "
            f"({_failures(exc)}). Was it saved from a different model config or optimizer?"
        ) from None
    except CheckpointError:
        raise
    except dist.DistError as exc:
        raise DistributedError(f"rank {group_rank()}: loading {folder} failed: {exc}") from exc
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"rank {group_rank()}: cannot load {folder} into this model/optimizer: "
            f"{str(exc).strip().splitlines()[0][:400]}"
        ) from exc


def save_dcp(
    path: str | Path,
    strategy: Strategy,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> list[Path]:
    """Write ``path/model`` (and ``path/optim``) as DCP folders, each rank its shard.

    Collective (over ``process_group``, default: the whole run). ``path`` must be one folder
    every rank sees (a shared filesystem across nodes).

    Returns:
        Every file of the checkpoint (all ranks' shards and the ``.metadata`` files), sorted.
    """
    path = Path(path)
    model_sd, optim_sd = strategy.sharded_state_dict(model, optimizer)
    write_dcp(model_sd, path / "model", process_group=process_group)
    folders = [path / "model"]
    if optimizer is not None:
        write_dcp(optim_sd, path / "optim", process_group=process_group)
        folders.append(path / "optim")
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())


def load_dcp(
    path: str | Path,
    strategy: Strategy,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Load what :func:`save_dcp` wrote, under any strategy and world size. Collective.

    Raises:
        CheckpointError: a folder is missing, its metadata is not DCP's, or it does not hold
            the state this model and optimizer need.
    """
    path = Path(path)
    load_module_shards(path / "model", strategy, model, process_group=process_group)
    if optimizer is not None:
        load_optimizer_shards(
            path / "optim", strategy, model, optimizer, process_group=process_group
        )


def load_module_shards(
    folder: Path,
    strategy: Strategy,
    module: nn.Module,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Load a module's DCP folder into ``module`` (resharded for this strategy). Collective."""
    state, _ = strategy.sharded_state_dict(module, None)
    read_dcp_into(state, folder, process_group=process_group)
    strategy.load_sharded_state_dict(module, None, state, {})


def load_optimizer_shards(
    folder: Path,
    strategy: Strategy,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Load an optimizer's DCP folder into ``optimizer`` of ``module``. Collective."""
    optimizer.zero_grad(set_to_none=True)  # torch creates missing state with a zero step
    _, state = strategy.sharded_state_dict(module, optimizer)
    read_dcp_into(state, folder, process_group=process_group)
    strategy.load_sharded_state_dict(module, optimizer, None, state)


def read_dcp_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint in ``folder``, whole, on the CPU, in this process.

    For inspection and export (a sharded checkpoint's ``model/`` folder gives the model's
    weights by parameter name); needs no process group and no model.

    Raises:
        CheckpointError: ``folder`` holds no DCP checkpoint, or its metadata is not DCP's.
    """
    folder = Path(folder)
    _require_metadata(folder)
    metadata = read_dcp_metadata(folder)
    sizes: dict[str, int | None] = {}
    for rel in storage_files(metadata):
        try:
            sizes[rel] = lstat_inside(folder, rel).st_size
        except FileNotFoundError:
            sizes[rel] = None
    check_storage_sizes(metadata, sizes, folder / ".metadata")
    tensors = {
        fqn: meta
        for fqn, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    for fqn, meta in tensors.items():
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        size = getattr(meta, "size", None)
        if not isinstance(dtype, torch.dtype) or not (
            isinstance(size, tuple) and all(isinstance(d, int) and d >= 0 for d in size)
        ):
            raise CheckpointError(f"{folder / '.metadata'}: tensor {fqn!r}: garbled size/dtype")
    # Every tensor is stored whole somewhere in the shards: a size the files cannot hold is a
    # garbled .metadata, refused before it becomes an allocation.
    claimed = sum(math.prod(m.size) * m.properties.dtype.itemsize for m in tensors.values())
    stored = sum(size or 0 for size in sizes.values())
    if claimed > stored:
        raise CheckpointError(
            f"{folder / '.metadata'}: describes {claimed} bytes of tensors, but its shard files "
            f"hold {stored}; the metadata is garbled"
        )
    state: StateDict = {
        fqn: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for fqn, meta in tensors.items()
    }
    read_dcp_into(state, folder, no_dist=True)
    return state


def _drop_unsaved_optimizer_state(state: StateDict, folder: Path) -> None:
    """Leave out of an optimizer's load target the parameters the checkpoint has no state
    for, in place: a parameter that never had a gradient (the dense MLP of an MoE layer that
    is on) has no optimizer state when saved, while a new optimizer's target lists every
    parameter. Such a parameter stays without state, as it was in the saved run."""
    per_param = state.get("state")
    if not isinstance(per_param, dict) or "param_groups" not in state:
        return  # not an optimizer's state dict
    saved = SafeFileSystemReader(folder).read_metadata().state_dict_metadata
    prefixes = {key.rsplit(".", 1)[0] for key in saved if key.startswith("state.")}
    for name in list(per_param):
        if f"state.{name}" not in prefixes:
            del per_param[name]


def _require_metadata(folder: Path) -> None:
    """``folder/.metadata`` is a regular file inside ``folder``.

    Raises:
        CheckpointError: there is none (no DCP checkpoint), or it is refused (a link, a FIFO).
    """
    try:
        lstat_inside(folder, ".metadata")
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"rank {group_rank()}: {folder} holds no DCP checkpoint (no .metadata file)."
        ) from None


def _failures(exc: CheckpointException) -> str:
    """One line per failed rank, from DCP's exception (which carries each rank's error)."""
    parts = []
    for rank, (error, _trace) in sorted(exc.failures.items()):
        text = str(error).strip().splitlines()
        parts.append(f"rank {rank}: {type(error).__name__}: {text[0][:400] if text else ''}")
    return "; ".join(parts)
