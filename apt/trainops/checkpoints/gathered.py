"""``GatheredStatePayload``: full state gathered through a distributed strategy.

The Trainer saves through this payload under every strategy, so a checkpoint has one format
whatever wrote it: model weights by parameter name (``model/model.safetensors``) and the
optimizer state keyed by parameter name (``optim/optimizer.*``), as
``torch.distributed.checkpoint.state_dict`` returns them. A run saved under FSDP on two ranks
therefore resumes in one process or under DDP, and the reverse.
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

__all__ = ["GatheredStatePayload"]

_OPTIM_FILE = "optim/optimizer.pt"
_OTHERS = (("scheduler", "optim/scheduler.pt"), ("scaler", "optim/scaler.pt"))


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
        for name, _ in _OTHERS:
            obj = getattr(objs, name)
            if obj is not None:
                snap[name] = snapshot(obj.state_dict(), what=f"{name} state", buffers=buffers)
        return snap

    def write(self, files: StageFiles, snap: Any, *, is_writer: bool) -> None:
        if snap is None:
            return
        files.write(MODEL_FILE, functools.partial(_save_tensors, snap["model"]))
        for name, rel in (("optimizer", _OPTIM_FILE), *_OTHERS):
            if name in snap:
                skeleton, tensors = split_tensors(snap[name])
                files.write(rel, functools.partial(torch.save, skeleton))
                if tensors:
                    files.write(_tensor_file(rel), functools.partial(_save_tensors, tensors))

    def load(self, ckpt: VerifiedCheckpoint, objs: Objects, *, map_location: str) -> None:
        if objs.model is None:
            raise CheckpointError("GatheredStatePayload loads a model; none was given")
        path = ckpt.file(MODEL_FILE)
        if path is None:
            raise CheckpointError(f"{ckpt.path} holds no {MODEL_FILE}")
        model_sd, _ = read_safetensors(path, device=map_location)
        optim_sd = (
            self._read(ckpt, "optimizer", _OPTIM_FILE, map_location)
            if objs.optimizer is not None
            else {}
        )
        self.strategy.load_full_state_dict(objs.model, objs.optimizer, model_sd, optim_sd)
        for name, rel in _OTHERS:
            obj = getattr(objs, name)
            if obj is not None:
                try:
                    obj.load_state_dict(self._read(ckpt, name, rel, map_location))
                except (RuntimeError, ValueError, KeyError) as exc:
                    raise CheckpointError(
                        f"{ckpt.path / rel} does not fit the {name}: {exc}"
                    ) from None

    @staticmethod
    def _read(ckpt: VerifiedCheckpoint, name: str, rel: str, map_location: str) -> Any:
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
