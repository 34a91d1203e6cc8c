"""Payloads: how the parts' state lies inside a checkpoint folder.

The manager owns the transaction (stage folder, manifest, rename, LATEST, retention); a payload
owns only the bytes of the parts (:mod:`~apt.trainops.checkpoints.parts` names their folders).
Two payloads here write whole (unsharded) states from the writer rank:

* :class:`FullStatePayload` (the default): each object's own ``state_dict()``, no collectives,
  so it serves any process and any wrapper. Optimizer state is keyed by parameter index.
* :class:`GatheredStatePayload`: the run's strategy gathers the full state on the writer rank
  (collective), optimizer state keyed by parameter name, as
  ``torch.distributed.checkpoint.state_dict`` returns it: what the Trainer saves through under
  one process and DDP.

Both read both key styles, and :class:`~apt.trainops.checkpoints.sharded.ShardedStatePayload`
(each rank writes its DCP shard) reads these too. Files of a whole state::

    model/model.safetensors        a module: weights by clean name (no _orig_mod./module.)
    optim/optimizer.pt             an optimizer: its state with tensors replaced by markers,
    optim/optimizer.safetensors      read back with torch.load(weights_only=True), and the tensors
    parts/<name>/state.pt          any other part (lr_scheduler, scaler, ...), the same way
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from apt.trainops.checkpoints.fsio import StageFiles
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint
from apt.trainops.checkpoints.parts import Part, module_of, part_file
from apt.trainops.checkpoints.restore import load_parts
from apt.trainops.checkpoints.safetensors_file import write_safetensors
from apt.trainops.checkpoints.tensorio import (
    SnapshotBuffers,
    clean_state_names,
    snapshot,
    split_tensors,
)
from apt.trainops.distributed import Strategy, unwrap_model

__all__ = [
    "FullStatePayload",
    "GatheredStatePayload",
    "Payload",
    "snapshot_state_parts",
    "write_state",
    "write_state_parts",
]

StateDict = dict[str, Any]


class Payload(Protocol):
    """How the state of a checkpoint's parts is written into, and read from, its folder."""

    @property
    def holds_part(self) -> bool:
        """This rank's modules hold part of the model (pipeline stages), so a whole state is
        loaded in part (:attr:`~apt.trainops.checkpoints.parts.Part.partial`)."""
        ...

    def snapshot(
        self, parts: list[Part], *, buffers: SnapshotBuffers | None, is_writer: bool
    ) -> Any:
        """Copy the state this rank writes (caller's thread; the only blocking part of async)."""
        ...

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        """Write ``snap`` into the stage folder (every rank; may run in the writer thread)."""
        ...

    def load(self, ckpt: VerifiedCheckpoint, parts: list[Part], *, map_location: str) -> None:
        """Load the verified checkpoint into the given parts (every rank)."""
        ...


# ---------------------------------------------------------------------------- state files
def write_state(files: StageFiles, rel: str, state: Any) -> None:
    """A state dict as ``rel`` (its structure, through torch.save) and, when it holds tensors,
    ``rel`` with ``.safetensors`` (the tensors)."""
    skeleton, tensors = split_tensors(state)
    files.write(rel, functools.partial(torch.save, skeleton))
    if tensors:
        files.write(
            rel.removesuffix(".pt") + ".safetensors", functools.partial(_write_tensors, tensors)
        )


def snapshot_state_parts(parts: list[Part], buffers: SnapshotBuffers | None) -> dict[str, Any]:
    """Copies of the state dicts of the ``state`` parts (LR scheduler, scaler, ...)."""
    return {
        p.name: snapshot(p.obj.state_dict(), what=f"{p.name} state", buffers=buffers)
        for p in parts
        if p.kind == "state"
    }


def write_state_parts(files: StageFiles, snap: dict[str, Any]) -> None:
    """Write what :func:`snapshot_state_parts` copied."""
    for name, state in snap.items():
        write_state(files, part_file(name, "state"), state)


# ---------------------------------------------------------------------------- payloads
class _WholeState:
    """A whole-state payload: module and optimizer state written by the writer rank."""

    #: Gathers and loads states (None: each object's own state_dict, no collectives).
    strategy: Strategy | None = None
    holds_part = False

    def _gather(
        self, module: Part | None, optimizer: Part | None, parts: list[Part]
    ) -> tuple[StateDict | None, StateDict | None]:
        raise NotImplementedError

    def snapshot(
        self, parts: list[Part], *, buffers: SnapshotBuffers | None, is_writer: bool
    ) -> Any:
        states: dict[str, tuple[str, Any]] = {}
        for module, optimizer, first in _pairs(parts):
            module_sd, optim_sd = self._gather(module, optimizer, parts)  # may be collective
            if not is_writer:
                continue
            if module is not None and first:
                states[module.name] = (
                    "module",
                    snapshot(module_sd, what=module.name, buffers=buffers),
                )
            if optimizer is not None:
                states[optimizer.name] = (
                    "optimizer",
                    snapshot(optim_sd, what=f"{optimizer.name} state", buffers=buffers),
                )
        if not is_writer:
            return None
        return {"whole": states, "state": snapshot_state_parts(parts, buffers)}

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        if snap is None:
            return
        for name, (kind, state) in snap["whole"].items():
            if kind == "module":
                rel = part_file(name, "module", ".safetensors")
                files.write(rel, functools.partial(_write_tensors, state))
            else:
                write_state(files, part_file(name, "optimizer"), state)
        write_state_parts(files, snap["state"])

    def load(self, ckpt: VerifiedCheckpoint, parts: list[Part], *, map_location: str) -> None:
        load_parts(ckpt, parts, strategy=self.strategy, map_location=map_location)


def _pairs(parts: list[Part]) -> Iterator[tuple[Part | None, Part | None, bool]]:
    """(module, optimizer, first): each module part with each of its optimizers (``first`` once
    per module: that pair also saves and loads the module), then each optimizer whose module is
    not among the parts."""
    for module in (p for p in parts if p.kind == "module"):
        optimizers = [p for p in parts if p.kind == "optimizer" and p.module == module.name]
        for i, optimizer in enumerate(optimizers or [None]):
            yield module, optimizer, i == 0
    for orphan in (p for p in parts if p.kind == "optimizer" and p.module is None):
        yield None, orphan, False


def _write_tensors(tensors: dict[str, torch.Tensor], fh: Any) -> None:
    write_safetensors(fh.write, tensors, {})


class FullStatePayload(_WholeState):
    """Each object's own ``state_dict()``, written by the writer rank; no collectives."""

    def _gather(
        self, module: Part | None, optimizer: Part | None, parts: list[Part]
    ) -> tuple[StateDict | None, StateDict | None]:
        module_sd = clean_state_names(unwrap_model(module.obj).state_dict()) if module else None
        return module_sd, optimizer.obj.state_dict() if optimizer is not None else None


class GatheredStatePayload(_WholeState):
    """Full model and optimizer state gathered on the writer rank through ``strategy``
    (``full_state_dict`` / ``load_full_state_dict``: collective).

    Args:
        strategy: the run's :class:`~apt.trainops.distributed.Strategy`.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy: Strategy = strategy

    def _gather(
        self, module: Part | None, optimizer: Part | None, parts: list[Part]
    ) -> tuple[StateDict | None, StateDict | None]:
        assert module is not None or optimizer is not None
        owner = module.obj if module is not None else module_of(optimizer, parts)  # type: ignore[arg-type]
        module_sd, optim_sd = self.strategy.full_state_dict(
            owner, optimizer.obj if optimizer is not None else None
        )
        return (clean_state_names(module_sd) if module is not None else None), optim_sd
