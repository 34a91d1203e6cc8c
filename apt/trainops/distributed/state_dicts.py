"""Model and optimizer state dicts across strategies, through torch's state-dict API.

Two forms, both keyed by the user's parameter names (no ``module.`` / ``_orig_mod.`` prefixes),
so any strategy reads what any other wrote:

* full: plain CPU tensors gathered on rank 0 (:func:`gather_full_state`,
  :func:`load_full_state`), for export and gathered checkpoints;
* sharded: each rank's own part, DTensor shards under FSDP (:func:`sharded_state`,
  :func:`load_sharded_state`), which ``torch.distributed.checkpoint`` writes and reads (the
  files are the business of :mod:`apt.trainops.checkpoints.dcp`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from apt.core.errors import CheckpointError
from apt.trainops.distributed.dtensor import is_dtensor
from apt.trainops.distributed.env import group_rank, group_world_size, in_process_group

__all__ = [
    "StateDict",
    "gather_full_state",
    "load_full_state",
    "load_sharded_state",
    "sharded_state",
]

StateDict = dict[str, Any]


def _dcp_state_dict() -> Any:
    """``torch.distributed.checkpoint.state_dict``, imported on first use: importing
    ``torch.distributed.checkpoint`` costs most of a second, which a run only pays when it
    saves, loads or exports."""
    import torch.distributed.checkpoint.state_dict as state_dict

    return state_dict


def _full_on_rank0() -> Any:
    return _dcp_state_dict().StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[StateDict, StateDict]:
    """Full, unsharded CPU copies of the model and optimizer state, on rank 0.

    Collective: every rank must call it. Other ranks get empty dicts. The optimizer state is
    keyed by parameter name (``{"state": {name: {...}}, "param_groups": [...]}``); it is ``{}``
    when ``optimizer`` is None.
    """
    model_sd = _dcp_state_dict().get_model_state_dict(model, options=_full_on_rank0())
    optim_sd: StateDict = {}
    if optimizer is not None:
        optim_sd = _optimizer_state(model, optimizer, _full_on_rank0())
    # Unsharded CPU tensors come back as the live parameters and optimizer buffers themselves;
    # a snapshot must not change when training goes on (an async save reads it later).
    live = _storages(model, optimizer)
    return _copy_aliases(model_sd, live), _copy_aliases(optim_sd, live)


def _optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, options: Any = None
) -> StateDict:
    """get_optimizer_state_dict without its side effect on an optimizer that never stepped.

    torch creates the missing state with a zero-gradient, lr=0 step (Adam's ``step`` becomes 1);
    that state is what gets saved, but the live optimizer is put back as it was, so saving
    before the first step does not change the run.
    """
    pristine = not optimizer.state
    try:
        return _dcp_state_dict().get_optimizer_state_dict(model, optimizer, options=options)
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
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


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
    if group_world_size() == 1:
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
    model_sd: StateDict | None,
    optim_sd: StateDict,
) -> None:
    """Load full states (as :func:`gather_full_state` returns them) into a wrapped model.

    Collective. When every rank passes the states, each loads its own copy; when only rank 0
    does (the others pass ``{}``), rank 0 broadcasts them. ``model_sd=None`` (on every rank)
    loads the optimizer alone. Gradients are cleared first, since the optimizer's state is
    created with a zero-gradient step where it does not exist yet.

    Raises:
        CheckpointError: rank 0 has no model state, or names do not match the model.
    """
    rank0_has, all_have = _who_has(model_sd or {}, optim_sd)
    if model_sd is not None:
        if not rank0_has[0]:
            raise CheckpointError(
                f"rank {group_rank()}: load_full_state got no model state on rank 0."
            )
        _load_full_model(model, model_sd, broadcast=not all_have[0])
    if optimizer is None or not rank0_has[1]:
        return
    optimizer.zero_grad(set_to_none=True)
    if rank0_has[2]:
        _dcp_state_dict().set_optimizer_state_dict(
            model,
            optimizer,
            _copy_optim_state(optim_sd),
            options=(
                _dcp_state_dict().StateDictOptions(
                    full_state_dict=True, broadcast_from_rank0=not all_have[1]
                )
            ),
        )
        return
    # A stateless optimizer (SGD without momentum) has no tensor to place a shard of; torch's
    # loader cannot find a device then, so only its hyper-parameters are copied.
    groups = [optim_sd.get("param_groups") if optim_sd else None]
    if in_process_group() and not all_have[1]:
        dist.broadcast_object_list(groups, src=0)
    for group, saved in zip(optimizer.param_groups, groups[0] or [], strict=False):
        group.update({k: v for k, v in saved.items() if k != "params"})


def _load_full_model(model: nn.Module, model_sd: StateDict, *, broadcast: bool) -> None:
    try:
        # torch writes the loaded (sharded) values back into the dict it is given: copy.
        _dcp_state_dict().set_model_state_dict(
            model,
            dict(model_sd),
            options=_dcp_state_dict().StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=broadcast
            ),
        )
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"rank {group_rank()}: the model state does not fit this model ({exc}). Was it saved "
            "from a different model config?"
        ) from exc


def sharded_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[StateDict, StateDict]:
    """This rank's model and optimizer state as DCP writes it, keyed by parameter name.

    DTensor shards under FSDP, whole tensors otherwise; these are the live tensors, not copies.
    The optimizer state is ``{}`` when ``optimizer`` is None.
    """
    model_sd = _dcp_state_dict().get_model_state_dict(model)
    optim_sd = _optimizer_state(model, optimizer) if optimizer is not None else {}
    return model_sd, optim_sd


def load_sharded_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: StateDict | None,
    optim_sd: StateDict,
) -> None:
    """Put states shaped like :func:`sharded_state`'s (filled by a DCP load) into the model and
    optimizer; ``model_sd=None`` leaves the weights alone. Gradients are cleared first (see
    :func:`load_full_state`)."""
    if model_sd is not None:
        _dcp_state_dict().set_model_state_dict(model, model_sd)
    if optimizer is None:
        return
    optimizer.zero_grad(set_to_none=True)
    # strict=False: a parameter that never had a gradient (the dense MLP of an MoE layer that
    # is on) was saved without optimizer state and stays without it; the read left it out
    # (apt.trainops.checkpoints.dcp). Every other key must still be there to be read.
    options = _dcp_state_dict().StateDictOptions(strict=False)
    _dcp_state_dict().set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
