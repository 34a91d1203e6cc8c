"""Model and optimizer state across strategies, through ``torch.distributed.checkpoint``.

Two forms, both keyed by the user's parameter names (no ``module.`` / ``_orig_mod.`` prefixes),
so any strategy reads what any other wrote:

* full: plain CPU tensors gathered on rank 0 (:func:`gather_full_state`,
  :func:`load_full_state`), for export and small runs;
* sharded: a DCP folder per state (``model/``, ``optim/``) in which each rank writes its own
  shard (:func:`save_dcp`, :func:`load_dcp`); DCP reshards on load, so FSDP x2 resumes in one
  process or under DDP x4, and the reverse.

Loading never unpickles arbitrary objects: DCP's ``.metadata`` is read with an unpickler that
accepts only DCP's own metadata classes, and the non-tensor values of a state (optimizer
hyper-parameters, parameter names) with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from apt.core.errors import CheckpointError, DistributedError
from apt.trainops.distributed.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

__all__ = [
    "gather_full_state",
    "load_dcp",
    "load_full_state",
    "read_dcp_tensors",
    "save_dcp",
    "sharded_state",
    "write_dcp",
]

StateDict = dict[str, Any]

_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[StateDict, StateDict]:
    """Full, unsharded CPU copies of the model and optimizer state, on rank 0.

    Collective: every rank must call it. Other ranks get empty dicts. The optimizer state is
    keyed by parameter name (``{"state": {name: {...}}, "param_groups": [...]}``); it is ``{}``
    when ``optimizer`` is None.
    """
    model_sd = get_model_state_dict(model, options=_FULL_ON_RANK0)
    optim_sd: StateDict = {}
    if optimizer is not None:
        optim_sd = _optimizer_state(model, optimizer, _FULL_ON_RANK0)
    # Unsharded CPU tensors come back as the live parameters and optimizer buffers themselves;
    # a snapshot must not change when training goes on (an async save reads it later).
    live = _storages(model, optimizer)
    return _copy_aliases(model_sd, live), _copy_aliases(optim_sd, live)


def _optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, options: StateDictOptions | None = None
) -> StateDict:
    """get_optimizer_state_dict without its side effect on an optimizer that never stepped.

    torch creates the missing state with a zero-gradient, lr=0 step (Adam's ``step`` becomes 1);
    that state is what gets saved, but the live optimizer is put back as it was, so saving
    before the first step does not change the run.
    """
    pristine = not optimizer.state
    try:
        return get_optimizer_state_dict(model, optimizer, options=options)
    finally:
        if pristine:
            optimizer.state.clear()


def _storages(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    if optimizer is not None:
        tensors += [
            v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)
        ]
    return {_local(t).untyped_storage().data_ptr() for t in tensors}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _copy_aliases(tree: Any, live: set[int]) -> Any:
    if isinstance(tree, torch.Tensor):
        aliased = _local(tree).untyped_storage().data_ptr() in live
        return tree.detach().clone() if aliased else tree
    if isinstance(tree, dict):
        return {k: _copy_aliases(v, live) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_aliases(v, live) for v in tree]
    return tree


def _has_tensor_state(optim_sd: StateDict) -> bool:
    """True when the optimizer state holds per-parameter tensors (not a stateless SGD)."""
    for per_param in optim_sd.get("state", {}).values():
        if any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in per_param.values()):
            return True
    return False


def _who_has(model_sd: StateDict, optim_sd: StateDict) -> tuple[list[bool], list[bool]]:
    """(flags of rank 0, flags all ranks share) for (model, optim, optim tensors)."""
    mine = [bool(model_sd), bool(optim_sd), _has_tensor_state(optim_sd)]
    if not _distributed() or dist.get_world_size() == 1:
        return mine, mine
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if "nccl" in str(dist.get_backend())
        else torch.device("cpu")
    )
    everyone = torch.tensor(mine, dtype=torch.int64, device=device)
    dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
    rank0 = torch.tensor(mine, dtype=torch.int64, device=device)
    dist.broadcast(rank0, src=0)
    return [bool(v) for v in rank0.tolist()], [bool(v) for v in everyone.tolist()]


def _copy_optim_state(optim_sd: StateDict) -> StateDict:
    """A copy of the containers (not the tensors) of an optimizer state dict."""
    if not optim_sd:
        return {}
    return {
        "state": {name: dict(values) for name, values in optim_sd.get("state", {}).items()},
        "param_groups": [dict(group) for group in optim_sd.get("param_groups", [])],
    }


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: StateDict,
    optim_sd: StateDict,
) -> None:
    """Load full states (as :func:`gather_full_state` returns them) into a wrapped model.

    Collective. When every rank passes the states, each loads its own copy; when only rank 0
    does (the others pass ``{}``), rank 0 broadcasts them. Gradients are cleared first, since
    the optimizer's state is created with a zero-gradient step where it does not exist yet.

    Raises:
        CheckpointError: rank 0 has no model state, or names do not match the model.
    """
    rank0_has, all_have = _who_has(model_sd, optim_sd)
    if not rank0_has[0]:
        raise CheckpointError(f"rank {_rank()}: load_full_state got no model state on rank 0.")
    broadcast = not all_have[0]
    try:
        # torch writes the loaded (sharded) values back into the dict it is given: copy.
        set_model_state_dict(
            model,
            dict(model_sd),
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast),
        )
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"rank {_rank()}: the model state does not fit this model ({exc}). Was it saved "
            "from a different model config?"
        ) from exc
    if optimizer is None or not rank0_has[1]:
        return
    optimizer.zero_grad(set_to_none=True)
    if rank0_has[2]:
        set_optimizer_state_dict(
            model,
            optimizer,
            _copy_optim_state(optim_sd),
            options=(StateDictOptions(full_state_dict=True, broadcast_from_rank0=not all_have[1])),
        )
        return
    # A stateless optimizer (SGD without momentum) has no tensor to place a shard of; torch's
    # loader cannot find a device then, so only its hyper-parameters are copied.
    groups = [optim_sd.get("param_groups") if optim_sd else None]
    if _distributed() and not all_have[1]:
        dist.broadcast_object_list(groups, src=0)
    for group, saved in zip(optimizer.param_groups, groups[0] or [], strict=False):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _files_under(*folders: Path) -> list[Path]:
    return sorted(
        p for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file()
    )


def sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[StateDict, StateDict]:
    """This rank's model and optimizer state as DCP writes it, keyed by parameter name.

    DTensor shards under FSDP, whole tensors otherwise; these are the live tensors, not copies.
    The optimizer state is ``{}`` when ``optimizer`` is None.
    """
    model_sd = get_model_state_dict(model)
    optim_sd = _optimizer_state(model, optimizer) if optimizer is not None else {}
    return model_sd, optim_sd


def save_dcp(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> list[Path]:
    """Write ``path/model`` (and ``path/optim``) as DCP checkpoints, each rank its shard.

    Collective (over ``process_group``, default: the whole run). ``path`` must be one folder
    every rank sees (a shared filesystem across nodes).

    Returns:
        Every file of the checkpoint (all ranks' shards and the ``.metadata`` files), sorted.
    """
    path = Path(path)
    model_sd, optim_sd = sharded_state(model, optimizer)
    write_dcp(model_sd, path / "model", process_group=process_group)
    folders = [path / "model"]
    if optimizer is not None:
        write_dcp(optim_sd, path / "optim", process_group=process_group)
        folders.append(path / "optim")
    return _files_under(*folders)


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
                no_dist=not _distributed(),
            )
    except CheckpointException as exc:  # a BaseException: `except Exception` would miss it
        raise CheckpointError(
            f"rank {_rank()}: writing {folder} failed ({_failures(exc)}). Check free space and "
            "that every rank can write there."
        ) from None


def _failures(exc: CheckpointException) -> str:
    """One line per failed rank, from DCP's exception (which carries each rank's error)."""
    parts = []
    for rank, (error, _trace) in sorted(exc.failures.items()):
        text = str(error).strip().splitlines()
        parts.append(f"rank {rank}: {type(error).__name__}: {text[0][:400] if text else ''}")
    return "; ".join(parts)


def load_dcp(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Load a checkpoint written by :func:`save_dcp`, under any strategy and world size.

    Collective (over ``process_group``). Gradients are cleared first (see
    :func:`load_full_state`).

    Raises:
        CheckpointError: a folder is missing, its metadata is not DCP's, or it does not hold
            the state this model and optimizer need.
    """
    path = Path(path)
    model_sd = get_model_state_dict(model)
    _dcp_load(model_sd, path / "model", process_group)
    set_model_state_dict(model, model_sd)
    if optimizer is None:
        return
    optimizer.zero_grad(set_to_none=True)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    _dcp_load(optim_sd, path / "optim", process_group)
    set_optimizer_state_dict(model, optimizer, optim_sd)


def read_dcp_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint in ``folder``, whole, on the CPU, in this process.

    For inspection and export (a sharded checkpoint's ``model/`` folder gives the model's
    weights by parameter name); needs no process group and no model.

    Raises:
        CheckpointError: ``folder`` holds no DCP checkpoint, or its metadata is not DCP's.
    """
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder} holds no DCP checkpoint (no .metadata file).")
    metadata = SafeFileSystemReader(folder).read_metadata()
    state: StateDict = {
        fqn: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for fqn, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    _dcp_load(state, folder, None, no_dist=True)
    return state


def _dcp_load(
    state: StateDict,
    folder: Path,
    process_group: dist.ProcessGroup | None,
    *,
    no_dist: bool | None = None,
) -> None:
    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"rank {_rank()}: {folder} holds no DCP checkpoint (no .metadata file)."
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a")
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(folder),
                planner=SafeLoadPlanner(),
                process_group=process_group,
                no_dist=not _distributed() if no_dist is None else no_dist,
            )
    except CheckpointException as exc:
        raise CheckpointError(
            f"rank {_rank()}: cannot load {folder} into this model/optimizer ({_failures(exc)})."
            " Was it saved from a different model config or optimizer?"
        ) from None
    except CheckpointError:
        raise
    except dist.DistError as exc:
        raise DistributedError(f"rank {_rank()}: loading {folder} failed: {exc}") from exc
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"rank {_rank()}: cannot load {folder} into this model/optimizer: "
            f"{str(exc).strip().splitlines()[0][:400]}"
        ) from exc
