"""``GatheredStatePayload``: full state gathered through a distributed strategy.

The Trainer saves through this payload under the replicated strategies (one process, DDP), so
such a checkpoint holds model weights by parameter name (``model/model.safetensors``) and the
optimizer state keyed by parameter name (``optim/optimizer.*``), as
``torch.distributed.checkpoint.state_dict`` returns them. Loading accepts this format and the
sharded one (:mod:`~apt.trainops.checkpoints.sharded`), so a run saved under FSDP on two ranks
resumes in one process or under DDP, and the reverse.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import torch

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.fsio import StageFiles
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint
from apt.trainops.checkpoints.payload import MODEL_FILE, Objects, _save_tensors, _tensor_file
from apt.trainops.checkpoints.tensorio import (
    SnapshotBuffers,
    clean_state_names,
    join_tensors,
    read_safetensors,
    snapshot,
    split_tensors,
)

__all__ = ["GatheredStatePayload", "load_strategy_state"]

_OPTIM_FILE = "optim/optimizer.pt"
_OTHERS = (("scheduler", "optim/scheduler.pt"), ("scaler", "optim/scaler.pt"))
#: The file only a sharded (DCP) checkpoint has.
DCP_MODEL_METADATA = "model/.metadata"
DCP_OPTIM_METADATA = "optim/.metadata"


class GatheredStatePayload:
    """Gathers the full model and optimizer state on the writer rank through ``strategy``
    (``full_state_dict`` / ``load_full_state_dict``), and writes it as the single-writer format.

    Args:
        strategy: the run's :class:`~apt.trainops.distributed.Strategy`.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy

    def snapshot(self, objs: Objects, *, buffers: SnapshotBuffers | None, is_writer: bool) -> Any:
        model_sd, optim_sd = self.strategy.full_state_dict(objs.model, objs.optimizer)  # collective
        if not is_writer:
            return None
        snap = {"model": snapshot(clean_state_names(model_sd), what="model", buffers=buffers)}
        if objs.optimizer is not None:
            snap["optimizer"] = snapshot(optim_sd, what="optimizer state", buffers=buffers)
        snap.update(snapshot_others(objs, buffers))
        return snap

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        if snap is None:
            return
        files.write(MODEL_FILE, functools.partial(_save_tensors, snap["model"]))
        if "optimizer" in snap:
            _write_state(files, _OPTIM_FILE, snap["optimizer"])
        write_others(files, snap)

    def load(self, ckpt: VerifiedCheckpoint, objs: Objects, *, map_location: str) -> None:
        load_strategy_state(ckpt, objs, self.strategy, map_location=map_location)


def load_strategy_state(
    ckpt: VerifiedCheckpoint,
    objs: Objects,
    strategy: Any,
    *,
    map_location: str,
    process_group: Any = None,
) -> None:
    """Load a gathered or a sharded checkpoint into objects wrapped by ``strategy``. Collective.

    Raises:
        CheckpointError: no model given, a file the load needs is not in the checkpoint, or
            the state does not fit the objects.
    """
    if objs.model is None:
        raise CheckpointError("a strategy checkpoint loads into a model; none was given")
    if ckpt.file(DCP_MODEL_METADATA) is not None:
        if objs.optimizer is not None and ckpt.file(DCP_OPTIM_METADATA) is None:
            raise CheckpointError(
                f"{ckpt.path} holds no optimizer state ({DCP_OPTIM_METADATA}); it was saved "
                "without one"
            )
        strategy.load_sharded(ckpt.path, objs.model, objs.optimizer, process_group=process_group)
    else:
        path = ckpt.file(MODEL_FILE)
        if path is None:
            raise CheckpointError(f"{ckpt.path} holds no {MODEL_FILE} and no {DCP_MODEL_METADATA}")
        model_sd, _ = read_safetensors(path, device=map_location)
        optim_sd = (
            read_state(ckpt, "optimizer", _OPTIM_FILE, map_location)
            if objs.optimizer is not None
            else {}
        )
        strategy.load_full_state_dict(objs.model, objs.optimizer, model_sd, optim_sd)
    load_others(ckpt, objs, map_location=map_location)


def snapshot_others(objs: Objects, buffers: SnapshotBuffers | None) -> dict[str, Any]:
    """Copies of the scheduler and scaler states (those given)."""
    out = {}
    for name, _ in _OTHERS:
        obj = getattr(objs, name)
        if obj is not None:
            out[name] = snapshot(obj.state_dict(), what=f"{name} state", buffers=buffers)
    return out


def write_others(files: StageFiles, snap: dict[str, Any]) -> None:
    """Write what :func:`snapshot_others` copied."""
    for name, rel in _OTHERS:
        if name in snap:
            _write_state(files, rel, snap[name])


def load_others(ckpt: VerifiedCheckpoint, objs: Objects, *, map_location: str) -> None:
    """Load the scheduler and scaler states into those given."""
    for name, rel in _OTHERS:
        obj = getattr(objs, name)
        if obj is not None:
            try:
                obj.load_state_dict(read_state(ckpt, name, rel, map_location))
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{ckpt.path / rel} does not fit the {name}: {exc}") from None


def _write_state(files: StageFiles, rel: str, state: Any) -> None:
    skeleton, tensors = split_tensors(state)
    files.write(rel, functools.partial(torch.save, skeleton))
    if tensors:
        files.write(_tensor_file(rel), functools.partial(_save_tensors, tensors))


def read_state(ckpt: VerifiedCheckpoint, name: str, rel: str, map_location: str) -> Any:
    """A state written by :func:`_write_state`, read back without unpickling objects."""
    path = ckpt.file(rel)
    if path is None:
        raise CheckpointError(
            f"{ckpt.path} holds no {name} state ({rel}); it was saved without one"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot read the {name} state ({exc})") from None
    tensor_path = ckpt.file(_tensor_file(rel))
    if tensor_path is not None:
        state = join_tensors(state, read_safetensors(tensor_path, map_location)[0])
    return state
