"""Reading a verified checkpoint into live parts, whatever format and strategy wrote it.

Each module and optimizer part is read in the format it was saved in: whole files
(``model/model.safetensors``, ``optim/optimizer.pt``) or a DCP folder of shards
(``model/.metadata``). A whole state loads into a plain module directly, or through a strategy
(which shards it under FSDP); a DCP folder loads through a strategy, which reshards it, so a
run saved under FSDP on two ranks resumes in one process or under DDP, and back. Optimizer
state keyed by parameter index (``optimizer.state_dict()``) and by parameter name
(``get_optimizer_state_dict``) are both accepted.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.dcp import load_module_shards, load_optimizer_shards
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint
from apt.trainops.checkpoints.parts import Part, module_of, part_file, part_folder
from apt.trainops.checkpoints.tensorio import clean_name, join_tensors, read_safetensors
from apt.trainops.distributed import Strategy, unwrap_model

__all__ = ["by_index", "by_name", "load_module_state", "load_parts", "read_state"]

StateDict = dict[str, Any]


def read_state(ckpt: VerifiedCheckpoint, rel: str, what: str, map_location: str) -> Any:
    """A state written as ``rel`` (+ ``.safetensors``), read back without unpickling objects.

    Raises:
        CheckpointError: the file is not in the checkpoint or cannot be read.
    """
    path = ckpt.file(rel)
    if path is None:
        raise CheckpointError(f"{ckpt.path} holds no {what} ({rel}); it was saved without one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc})") from None
    tensor_path = ckpt.file(rel.removesuffix(".pt") + ".safetensors")
    if tensor_path is not None:
        state = join_tensors(state, read_safetensors(tensor_path, map_location)[0])
    return state


def load_module_state(module: nn.Module, state: StateDict, source: str) -> None:
    """Load clean-named ``state`` into ``module`` (compiled, DDP-wrapped or plain), strictly.

    Raises:
        CheckpointError: names or shapes differ (lists what is missing and what is extra).
    """
    target = unwrap_model(module)
    own = {clean_name(key): key for key in target.state_dict()}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}. Build the model with the checkpoint's config."
        )
    try:
        target.load_state_dict({own[k]: v for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not fit the model: {exc}") from None


# ---------------------------------------------------------------------------- optimizer keys
def _param_names(module: nn.Module, optimizer: Optimizer) -> list[str]:
    """The clean name of each parameter of ``optimizer``, in its index order."""
    names = {id(p): clean_name(n) for n, p in unwrap_model(module).named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by_name(state: StateDict) -> bool:
    params = [k for g in state.get("param_groups", []) for k in g.get("params", [])]
    return bool(params) and isinstance(params[0], str)


def _rekey(state: StateDict, mapping: dict[Any, Any]) -> StateDict:
    return {
        "state": {mapping[k]: v for k, v in state.get("state", {}).items()},
        "param_groups": [
            {**g, "params": [mapping[k] for k in g["params"]]} for g in state["param_groups"]
        ],
    }


def by_index(state: StateDict, module: nn.Module | None, optimizer: Optimizer) -> StateDict:
    """An optimizer state keyed by parameter index (``optimizer.state_dict()``'s style).

    Raises:
        CheckpointError: the state is keyed by name and no module is given to match names.
    """
    if not _keyed_by_name(state):
        return state
    if module is None:
        raise CheckpointError(
            "this optimizer state is keyed by parameter name; give the module it trains as a "
            "part too, so the names can be matched"
        )
    return _rekey(state, {n: i for i, n in enumerate(_param_names(module, optimizer))})


def by_name(state: StateDict, module: nn.Module, optimizer: Optimizer) -> StateDict:
    """An optimizer state keyed by parameter name (``get_optimizer_state_dict``'s style)."""
    if _keyed_by_name(state) or not state.get("param_groups"):
        return state
    return _rekey(state, dict(enumerate(_param_names(module, optimizer))))


# ---------------------------------------------------------------------------- loading
def _is_dcp(ckpt: VerifiedCheckpoint, part: Part) -> bool:
    return ckpt.file(f"{part_folder(part.name, part.kind)}/.metadata") is not None


def _need_strategy(strategy: Strategy | None, ckpt: VerifiedCheckpoint) -> Strategy:
    if strategy is None:
        raise CheckpointError(
            f"{ckpt.path} is a sharded (DCP) checkpoint; load it with "
            "CheckpointManager(payload=ShardedStatePayload(strategy)), or read its weights with "
            f"apt.trainops.checkpoints.dcp.read_dcp_tensors('{ckpt.path / 'model'}')"
        )
    return strategy


def _read_module(ckpt: VerifiedCheckpoint, name: str, map_location: str) -> StateDict:
    rel = part_file(name, "module", ".safetensors")
    path = ckpt.file(rel)
    if path is None:
        raise CheckpointError(f"{ckpt.path} holds no {rel}")
    return read_safetensors(path, device=map_location)[0]


def _load_module(
    ckpt: VerifiedCheckpoint,
    module: Part,
    strategy: Strategy | None,
    group: dist.ProcessGroup | None,
    map_location: str,
) -> None:
    if _is_dcp(ckpt, module):
        folder = ckpt.path / part_folder(module.name, "module")
        load_module_shards(folder, _need_strategy(strategy, ckpt), module.obj, process_group=group)
        return
    state = _read_module(ckpt, module.name, map_location)
    if strategy is None:
        load_module_state(module.obj, state, f"{ckpt.path}'s {module.name}")
    else:
        strategy.load_full_state_dict(module.obj, None, state, {})


def _load_optimizer(
    ckpt: VerifiedCheckpoint,
    optimizer: Part,
    parts: list[Part],
    strategy: Strategy | None,
    group: dist.ProcessGroup | None,
    map_location: str,
) -> None:
    opt: Optimizer = optimizer.obj
    if _is_dcp(ckpt, optimizer):
        folder = ckpt.path / part_folder(optimizer.name, "optimizer")
        load_optimizer_shards(
            folder,
            _need_strategy(strategy, ckpt),
            module_of(optimizer, parts),
            opt,
            process_group=group,
        )
        return
    rel = part_file(optimizer.name, "optimizer")
    state = read_state(ckpt, rel, f"{optimizer.name} state", map_location)
    if strategy is None:
        module = next((p.obj for p in parts if p.name == optimizer.module), None)
        opt.load_state_dict(by_index(state, module, opt))
    else:
        owner = module_of(optimizer, parts)
        strategy.load_full_state_dict(owner, opt, None, by_name(state, owner, opt))


def load_parts(
    ckpt: VerifiedCheckpoint,
    parts: list[Part],
    *,
    strategy: Strategy | None = None,
    process_group: dist.ProcessGroup | None = None,
    map_location: str = "cpu",
) -> None:
    """Load every given part from ``ckpt``: modules, then optimizers, then the other parts.
    Collective when a strategy is given.

    Raises:
        CheckpointError: a part's files are missing, sharded files without a strategy to read
            them, or a state that does not fit its object.
    """
    for part in (p for p in parts if p.kind != "state"):
        try:
            if part.kind == "module":
                _load_module(ckpt, part, strategy, process_group, map_location)
            else:
                _load_optimizer(ckpt, part, parts, strategy, process_group, map_location)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{ckpt.path}: the saved {part.name} state does not fit the given {part.name}: "
                f"{exc}"
            ) from None
    version = ckpt.manifest.format_version
    for part in (p for p in parts if p.kind == "state"):
        rel = part_file(part.name, "state", format_version=version)
        state = read_state(ckpt, rel, f"{part.name} state", map_location)
        load = getattr(part.obj, "load_state_dict", None)
        if not callable(load):
            raise CheckpointError(
                f"part {part.name!r} ({type(part.obj).__name__}) has no load_state_dict()"
            )
        try:
            load(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{ckpt.path / rel} does not fit the {part.name}: {exc}"
            ) from None
