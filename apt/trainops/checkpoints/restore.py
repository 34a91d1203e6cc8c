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

from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.errors import CheckpointMismatchError
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint
from apt.trainops.checkpoints.parts import Part, check_loadable, module_of, part_file, part_folder
from apt.trainops.checkpoints.tensorio import clean_name, join_tensors
from apt.trainops.distributed import Strategy, unwrap_model

__all__ = ["by_index", "by_name", "check_fits", "load_module_state", "load_parts", "read_state"]

StateDict = dict[str, Any]


def read_state(ckpt: VerifiedCheckpoint, rel: str, what: str, map_location: str) -> Any:
    """A state written as ``rel`` (+ ``.safetensors``), read back without unpickling objects.

    Raises:
        CheckpointError: the file is not in the checkpoint or cannot be read.
    """
    if ckpt.file(rel) is None:
        raise CheckpointError(f"{ckpt.path} holds no {what} ({rel}); it was saved without one")
    state = ckpt.read_structure(rel, map_location)
    tensors_rel = rel.removesuffix(".pt") + ".safetensors"
    if ckpt.file(tensors_rel) is not None:
        state = join_tensors(state, ckpt.read_tensors(tensors_rel, map_location))
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


# ---------------------------------------------------------------------------- fit
def _listing(items: list[str]) -> str:
    return f"{items[:5]}{' ...' if len(items) > 5 else ''}"


def _module_fits(ckpt: VerifiedCheckpoint, part: Part) -> None:
    rel = part_file(part.name, "module", ".safetensors")
    saved = {name: (e.dtype, e.shape) for name, e in ckpt.tensor_entries(rel).items()}
    own = {
        clean_name(k): (v.dtype, tuple(v.shape))
        for k, v in unwrap_model(part.obj).state_dict().items()
    }
    missing = sorted(set(own) - set(saved))
    extra = [] if part.partial else sorted(set(saved) - set(own))  # the other stages' tensors
    wrong = sorted(
        f"{k} {saved[k][1]} {saved[k][0]} vs {own[k][1]} {own[k][0]}"
        for k in set(saved) & set(own)
        if saved[k] != own[k]
    )
    if missing or extra or wrong:
        fix = "Build the model with the checkpoint's config."
        if extra and not missing and not wrong:
            fix = (
                "It holds more tensors than the module: to load part of a whole model, load "
                "it through a payload that holds part (ShardedStatePayload of a pipeline "
                "strategy), or build the model with the checkpoint's config."
            )
        raise CheckpointMismatchError(
            f"{ckpt.path / rel} does not fit the {part.name}: missing {_listing(missing)}, "
            f"unexpected {_listing(extra)}, other shape or dtype (saved vs given) "
            f"{_listing(wrong)}. {fix}"
        )


def _optimizer_fits(ckpt: VerifiedCheckpoint, part: Part, parts: list[Part]) -> None:
    rel = part_file(part.name, "optimizer")
    state = ckpt.read_structure(rel)
    groups = state.get("param_groups")
    if not isinstance(state.get("state"), dict) or not (
        isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise CheckpointError(
            f"{ckpt.path / rel}: not an optimizer state: 'state' must be a dict and "
            "'param_groups' a list of groups, each with a 'params' list"
        )
    saved = [len(g["params"]) for g in groups]
    given = [len(g["params"]) for g in part.obj.param_groups]
    if part.partial:
        _part_of_groups(ckpt.path / rel, part, parts, groups)
    elif saved != given:
        raise CheckpointMismatchError(
            f"{ckpt.path / rel} does not fit the {part.name}: it has parameter groups of "
            f"{saved} parameters, the given optimizer {given}"
        )
    keys = [k for g in groups for k in g["params"]]
    indices = all(isinstance(k, int) and not isinstance(k, bool) for k in keys)
    if keys and all(isinstance(k, str) for k in keys):
        if not part.partial:  # a part's names were matched group by group above
            _names_fit(ckpt.path / rel, part, parts, keys)
    elif not indices or sorted(keys) != list(range(len(keys))):
        raise CheckpointError(
            f"{ckpt.path / rel}: not an optimizer state: its parameters must be the indices "
            f"0..{len(keys) - 1} or parameter names"
        )
    if not set(state["state"]) <= set(keys):
        raise CheckpointError(
            f"{ckpt.path / rel}: not an optimizer state: 'state' holds parameters that no "
            "parameter group lists"
        )


def _part_of_groups(where: Any, part: Part, parts: list[Part], groups: list[dict]) -> None:
    """A stage's optimizer against a whole one's groups: as many groups, each naming every
    parameter the stage's group holds (what a pipeline rank loads of a whole state)."""
    given = part.obj.param_groups
    if len(groups) != len(given):
        raise CheckpointMismatchError(
            f"{where} does not fit the {part.name}: it has {len(groups)} parameter groups, "
            f"the given optimizer {len(given)}"
        )
    keys = [k for g in groups for k in g["params"]]
    if not all(isinstance(k, str) for k in keys):
        raise CheckpointMismatchError(
            f"{where} keys its parameters by index, which cannot be matched to the "
            "parameters of part of the model; load it in one process and save it again "
            "through the Trainer (it keys them by name)"
        )
    try:
        names = _param_names(module_of(part, parts), part.obj)
    except KeyError:  # FSDP2 may hold other parameter objects than the module shows
        return
    start = 0
    for g, (group, saved) in enumerate(zip(given, groups, strict=True)):
        own = names[start : start + len(group["params"])]
        start += len(group["params"])
        absent = sorted(set(own) - set(saved["params"]))
        if absent:
            raise CheckpointMismatchError(
                f"{where} does not fit the {part.name}: its parameter group {g} does not "
                f"name {_listing(absent)}. Build the model with the checkpoint's config."
            )


def _names_fit(where: Any, part: Part, parts: list[Part], keys: list[str]) -> None:
    owner = next((p.obj for p in parts if p.name == part.module), None)
    if owner is None:
        return
    try:
        names = set(_param_names(owner, part.obj))
    except KeyError:  # FSDP2 may hold other parameter objects than the module shows
        return
    unknown = sorted(set(keys) - names)
    if unknown:
        raise CheckpointMismatchError(
            f"{where} does not fit the {part.name}: it updates parameters {_listing(unknown)} "
            f"that the {part.module} does not have"
        )


def check_fits(ckpt: VerifiedCheckpoint, parts: list[Part]) -> None:
    """Check that a verified checkpoint fits ``parts``, before anything is loaded into them.

    Reads only safetensors headers and the small optimizer structures: every part asked for is
    held, with the same kind; a whole-state module's tensors have the module's names, shapes
    and dtypes; a whole-state optimizer has the same parameter groups. (DCP folders are checked
    by DCP as it loads.)

    Raises:
        CheckpointMismatchError: a part is missing or does not fit (named, with what differs).
        CheckpointError: an optimizer state that is not one.
    """
    check_loadable(parts, ckpt.manifest.saved_parts(), str(ckpt.path))
    for part in parts:
        if part.kind == "module" and not _is_dcp(ckpt, part):
            _module_fits(ckpt, part)
        elif part.kind == "optimizer" and not _is_dcp(ckpt, part):
            _optimizer_fits(ckpt, part, parts)


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
    if ckpt.file(rel) is None:
        raise CheckpointError(f"{ckpt.path} holds no {rel}")
    return ckpt.read_tensors(rel, map_location)


def _load_module(
    ckpt: VerifiedCheckpoint,
    module: Part,
    strategy: Strategy | None,
    group: dist.ProcessGroup | None,
    map_location: str,
) -> None:
    if _is_dcp(ckpt, module):
        from apt.trainops.checkpoints.dcp import load_module_shards  # DCP imported on first use

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
        from apt.trainops.checkpoints.dcp import load_optimizer_shards  # on first use

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
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
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
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(
                f"{ckpt.path / rel} does not fit the {part.name}: {exc}"
            ) from None
