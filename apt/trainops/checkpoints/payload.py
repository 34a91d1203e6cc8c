"""The payload: how model and optimizer state lie inside a checkpoint folder.

The manager owns the transaction (stage folder, manifest, rename, LATEST, retention); a payload
owns only the bytes of the state. :class:`FullStatePayload` is the single-writer format::

    model/model.safetensors      clean parameter names (no ``_orig_mod.``/``module.``)
    optim/optimizer.pt           optimizer.state_dict() with its tensors replaced by markers,
                                 read back with torch.load(weights_only=True)
    optim/optimizer.safetensors  those tensors (exp_avg, exp_avg_sq, step, ...)
    optim/scheduler.pt           LR scheduler (when given; .safetensors too if it has tensors)
    optim/scaler.pt              GradScaler (when given)

A sharded payload (``torch.distributed.checkpoint`` into ``model/`` and ``optim/``, each rank
writing its shard) implements the same :class:`Payload` protocol: ``snapshot`` and ``write`` run
on every rank, files it writes without :class:`StageFiles` are hashed when the writer rank builds
the manifest, and ``load`` reads through the verified checkpoint.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any, Protocol

import torch
from torch import nn

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.fsio import StageFiles
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint
from apt.trainops.checkpoints.tensorio import (
    SnapshotBuffers,
    clean_name,
    clean_state_names,
    join_tensors,
    read_safetensors,
    snapshot,
    split_tensors,
    write_safetensors,
)
from apt.trainops.distributed import unwrap_model

__all__ = ["FullStatePayload", "Objects", "Payload"]

MODEL_FILE = "model/model.safetensors"
_STATEFUL = (
    ("optimizer", "optim/optimizer.pt"),
    ("scheduler", "optim/scheduler.pt"),
    ("scaler", "optim/scaler.pt"),
)


def _save_tensors(tensors: dict[str, torch.Tensor], fh: Any) -> None:
    write_safetensors(fh.write, tensors, {})


def _tensor_file(rel: str) -> str:
    return rel.removesuffix(".pt") + ".safetensors"


class Objects(Protocol):
    """What a payload saves and loads (the keyword arguments of ``save``/``load``)."""

    model: nn.Module | None
    optimizer: Any
    scheduler: Any
    scaler: Any


class Payload(Protocol):
    """How model/optimizer state is written into, and read from, a checkpoint folder."""

    def snapshot(self, objs: Objects, *, buffers: SnapshotBuffers | None, is_writer: bool) -> Any:
        """Copy the state this rank writes (caller's thread; the only blocking part of async)."""
        ...

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        """Write ``snap`` into the stage folder (every rank; may run in the writer thread)."""
        ...

    def load(self, ckpt: VerifiedCheckpoint, objs: Objects, *, map_location: str) -> None:
        """Load the verified checkpoint into the given objects (every rank)."""
        ...


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the user's module with clean names (no wrapper prefixes)."""
    return clean_state_names(unwrap_model(model).state_dict())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load clean-named ``state`` into ``model`` (compiled, DDP-wrapped or plain), strictly.

    Raises:
        CheckpointError: names or shapes differ (lists what is missing and what is extra).
    """
    target = unwrap_model(model)
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


class FullStatePayload:
    """Whole (unsharded) state, written by the writer rank only (single process, DDP)."""

    def snapshot(self, objs: Objects, *, buffers: SnapshotBuffers | None, is_writer: bool) -> Any:
        if not is_writer or objs.model is None:
            return None
        snap = {"model": snapshot(model_state(objs.model), what="model", buffers=buffers)}
        for name, _ in _STATEFUL:
            obj = getattr(objs, name)
            if obj is not None:
                snap[name] = snapshot(obj.state_dict(), what=f"{name} state", buffers=buffers)
        return snap

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        if snap is None:
            return
        files.write(MODEL_FILE, functools.partial(_save_tensors, snap["model"]))
        for name, rel in _STATEFUL:
            if name in snap:
                skeleton, tensors = split_tensors(snap[name])
                files.write(rel, functools.partial(torch.save, skeleton))
                if tensors:
                    files.write(_tensor_file(rel), functools.partial(_save_tensors, tensors))

    def load(self, ckpt: VerifiedCheckpoint, objs: Objects, *, map_location: str) -> None:
        if objs.model is not None:
            path = ckpt.file(MODEL_FILE)
            if path is None and ckpt.file("model/.metadata") is not None:
                raise CheckpointError(
                    f"{ckpt.path} is a sharded (DCP) checkpoint; load it with "
                    "CheckpointManager(payload=ShardedStatePayload(strategy)), or read its "
                    "weights with apt.trainops.checkpoints.dcp.read_dcp_tensors"
                    f"('{ckpt.path / 'model'}')"
                )
            if path is None:
                raise CheckpointError(f"{ckpt.path} holds no {MODEL_FILE}")

            state, _ = read_safetensors(path, device=map_location)
            load_model_state(objs.model, state, str(path))
        for name, rel in _STATEFUL:
            obj = getattr(objs, name)
            if obj is None:
                continue
            path = ckpt.file(rel)
            if path is None:
                raise CheckpointError(
                    f"{ckpt.path} holds no {name} state ({rel}) but a {name} was given to load; "
                    f"pass {name}=None to load without it"
                )
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
                tensor_path = ckpt.file(_tensor_file(rel))
                if tensor_path is not None:
                    state = join_tensors(state, read_safetensors(tensor_path, map_location)[0])
                obj.load_state_dict(state)
            except (RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
                raise CheckpointError(f"{path} does not fit the given {name}: {exc}") from None
