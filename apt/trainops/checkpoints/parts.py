"""The parts of a checkpoint: named stateful objects, what kind each is, where its files lie.

A checkpoint saves a mapping of named parts, as ``torch.distributed.checkpoint``-style
checkpointers take it (``{"model": model, "optimizer": optimizer, "lr_scheduler": ...}``); a
LoRA adapter, a frozen reference model, a value head or a second optimizer is one more entry.
Each part is one of three kinds, decided by its type:

* ``module`` (an ``nn.Module``): its weights, by parameter name;
* ``optimizer`` (a ``torch.optim.Optimizer``): its state, next to the module part it optimises
  (found by parameter identity), so the state can be keyed by parameter name;
* ``state`` (anything else with ``state_dict()``, and ``load_state_dict()`` to be loaded: LR
  scheduler, GradScaler, ...): its state dict.

Folders inside a checkpoint (format version 2)::

    model/          the module part "model"        model.safetensors, or DCP shards
    optim/          the optimizer part "optimizer" optimizer.pt + optimizer.safetensors, or DCP
    parts/<name>/   every other part, in its kind's format (state parts: state.pt [+ .safetensors])

Format version 1 had only model, optimizer, scheduler and scaler: the scheduler and the scaler
lay in ``optim/scheduler.pt`` and ``optim/scaler.pt``; :func:`saved_parts` reads both versions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.errors import CheckpointMismatchError

__all__ = [
    "Part",
    "PartKind",
    "check_loadable",
    "describe_parts",
    "module_of",
    "part_file",
    "part_folder",
    "saved_parts",
]

PartKind = Literal["module", "optimizer", "state"]

#: The file stem of each kind inside its folder, and the two parts whose folders keep the names
#: they had in format version 1.
_STEMS: dict[str, str] = {"module": "model", "optimizer": "optimizer", "state": "state"}
_MAIN_FOLDERS = {("model", "module"): "model", ("optimizer", "optimizer"): "optim"}
#: Format version 1: parts by the files they were stored in.
_V1_STATE_FILES = {"lr_scheduler": "optim/scheduler.pt", "scaler": "optim/scaler.pt"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Part:
    """One named part of a checkpoint.

    Attributes:
        name: its key in the parts mapping (``model``, ``optimizer``, ``ref_model``, ...).
        kind: ``module``, ``optimizer`` or ``state``.
        obj: the live object.
        module: for an optimizer, the name of the module part whose parameters it updates.
        partial: a module (or its optimizer) that holds part of the model a checkpoint may
            hold whole, as a pipeline rank holds its stages: a whole state's tensors of the
            other parts are left unread instead of refused.
    """

    name: str
    kind: PartKind
    obj: Any
    module: str | None = None
    partial: bool = False

    @property
    def folder(self) -> str:
        """Its folder inside a checkpoint (``model``, ``optim`` or ``parts/<name>``)."""
        return part_folder(self.name, self.kind)

    def record(self) -> dict[str, str]:
        """What the manifest says of it."""
        return {"kind": self.kind, **({"module": self.module} if self.module else {})}


def part_folder(name: str, kind: str) -> str:
    """The folder of part ``name`` of ``kind`` inside a checkpoint."""
    return _MAIN_FOLDERS.get((name, kind), f"parts/{name}")


def part_file(name: str, kind: str, suffix: str = ".pt", *, format_version: int = 2) -> str:
    """The relative path of part ``name``'s file (``.pt``, ``.safetensors``) in a checkpoint."""
    if format_version == 1 and name in _V1_STATE_FILES:
        return _V1_STATE_FILES[name].removesuffix(".pt") + suffix
    return f"{part_folder(name, kind)}/{_STEMS[kind]}{suffix}"


def _kind(name: str, obj: Any) -> PartKind:
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, Optimizer):
        return "optimizer"
    if callable(getattr(obj, "state_dict", None)):
        return "state"
    raise CheckpointError(
        f"checkpoint part {name!r} is a {type(obj).__name__}, which has no state_dict(); give "
        "modules, optimizers or objects with state_dict() (and load_state_dict() to load)"
    )


def _owner(optimizer: Optimizer, modules: dict[str, nn.Module]) -> str | None:
    """The module part ``optimizer`` updates: the only one, or else the first holding every
    parameter it updates (None: none does).

    With one module part no identity check is made: FSDP2 swaps a module's registered
    parameters between the sharded ones the optimizer holds and unsharded views (a root left
    gathered after an evaluation's forward), so identity is only a tie-breaker.
    """
    if len(modules) == 1:
        return next(iter(modules))
    wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module_name, module in modules.items():
        if wanted <= {id(p) for p in module.parameters()}:
            return module_name
    return None


def module_of(part: Part, parts: list[Part]) -> nn.Module:
    """The live module an optimizer part updates (what keys its state by parameter name).

    Raises:
        CheckpointError: no single module part holds the optimizer's parameters.
    """
    for other in parts:
        if other.name == part.module:
            return other.obj
    modules = [p.name for p in parts if p.kind == "module"]
    raise CheckpointError(
        f"optimizer part {part.name!r} updates parameters that no single module part holds "
        f"(module parts: {', '.join(modules) or 'none'}); add the module it trains to the parts, "
        "as one nn.Module (an nn.ModuleDict joins several)"
    )


def describe_parts(parts: Mapping[str, Any], *, partial: bool = False) -> list[Part]:
    """Classify ``parts`` (entries whose value is None are left out), in their given order;
    ``partial`` marks the modules and optimizers as holding part of the model.

    Raises:
        CheckpointError: a name that is not lower_snake_case, or an object with no state dict.
    """
    given = {name: obj for name, obj in parts.items() if obj is not None}
    for name in given:
        if not _NAME.match(name):
            raise CheckpointError(
                f"checkpoint part name {name!r} must be lower_snake_case (letters, digits, _)"
            )
    kinds = {name: _kind(name, obj) for name, obj in given.items()}
    modules = {n: obj for n, obj in given.items() if kinds[n] == "module"}
    return [
        Part(
            name,
            kinds[name],
            obj,
            _owner(obj, modules) if kinds[name] == "optimizer" else None,
            partial=partial and kinds[name] != "state",
        )
        for name, obj in given.items()
    ]


def saved_parts(manifest_parts: dict[str, Any] | None, files: Mapping[str, Any]) -> dict[str, str]:
    """``{name: kind}`` of the parts a checkpoint holds.

    Args:
        manifest_parts: the manifest's ``parts`` (format version 2), or None (version 1).
        files: the manifest's files (version 1 parts are recognised by their files).
    """
    if manifest_parts is not None:
        return {name: str(rec["kind"]) for name, rec in manifest_parts.items()}
    found: dict[str, str] = {}
    if "model/model.safetensors" in files or "model/.metadata" in files:
        found["model"] = "module"
    if "optim/optimizer.pt" in files or "optim/.metadata" in files:
        found["optimizer"] = "optimizer"
    for name, rel in _V1_STATE_FILES.items():
        if rel in files:
            found[name] = "state"
    return found


def check_loadable(wanted: list[Part], held: dict[str, str], where: str) -> None:
    """Every part asked for is in the checkpoint, with the same kind.

    Raises:
        CheckpointMismatchError: naming the missing part, what the checkpoint holds, and the
            fix.
    """
    for part in wanted:
        kind = held.get(part.name)
        if kind is None:
            raise CheckpointMismatchError(
                f"{where} holds no {part.name} state: it was saved without a part "
                f"{part.name!r} (it holds: {', '.join(held) or 'nothing'}). Load without "
                f"{part.name}= (leave it out of the parts), or from a checkpoint that has it"
            )
        if kind != part.kind:
            raise CheckpointMismatchError(
                f"{where}: part {part.name!r} was saved as a {kind}, but a {part.kind} was "
                "given to load it into"
            )
