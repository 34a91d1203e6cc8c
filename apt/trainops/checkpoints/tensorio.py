"""Tensors in and out of a checkpoint: CPU snapshots, clean names, tensors split from structure.

* :func:`snapshot` copies a nested state (dicts, lists, tensors) to CPU memory. For an async
  save it copies into buffers kept between saves (pinned for CUDA tensors, with non-blocking
  copies), so the time the training loop is blocked is one memcpy, not an allocation storm.
  It also refuses, at save time, any value ``torch.load(weights_only=True)`` would refuse later.
* :func:`clean_state_names` removes the names wrappers add (``_orig_mod.`` from torch.compile,
  and friends), so a compiled model's checkpoint loads into a plain one and back.
* :func:`split_tensors` / :func:`join_tensors` take the tensors out of a nested state (written
  to safetensors, :mod:`~apt.trainops.checkpoints.safetensors_file`) and put them back.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.safetensors_file import alias_key

__all__ = [
    "SnapshotBuffers",
    "clean_name",
    "clean_state_names",
    "join_tensors",
    "snapshot",
    "split_tensors",
    "tensor_markers",
]

# Segments wrappers insert into parameter names: torch.compile, activation checkpointing, FSDP1.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

_TENSOR_MARK = "\x00apt-tensor:"  # a NUL never starts a real state value
_SAFE_LEAVES = (type(None), bool, int, float, str, torch.dtype, torch.device)


def clean_name(name: str) -> str:
    """``'blocks.0._orig_mod.attn.weight'`` -> ``'blocks.0.attn.weight'``."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def clean_state_names(state: dict[str, Any]) -> dict[str, Any]:
    """Drop wrapper segments (``_orig_mod.`` ...) from every key.

    Raises:
        CheckpointError: two keys become the same name.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        clean = clean_name(key)
        if clean in out:
            raise CheckpointError(f"state names {key!r} and another both clean to {clean!r}")
        out[clean] = value
    return out


class SnapshotBuffers:
    """CPU buffers reused by successive async snapshots (pinned when the source is on CUDA).

    Only safe because a new save waits for the previous one to finish writing.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.used_cuda = False

    def copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            self._buffers[key] = buf
        # Non-blocking D2H into pinned memory is ordered on the current stream before any later
        # in-place update of the source; the writer waits on cuda_done() before reading.
        buf.copy_(t.detach(), non_blocking=t.is_cuda)
        self.used_cuda = self.used_cuda or t.is_cuda
        return buf


def snapshot(
    obj: Any,
    *,
    what: str,
    buffers: SnapshotBuffers | None,
    _path: str = "",
    _memo: dict[tuple[Any, ...], torch.Tensor] | None = None,
) -> Any:
    """Copy ``obj`` (nested dicts/lists/tuples of tensors and plain values) for writing.

    Args:
        obj: the state (a ``state_dict()``).
        what: its name in error messages ("optimizer state").
        buffers: reusable copy targets (async save), or None to copy only what is not on the CPU
            already (sync save: the caller waits while the live tensors are written).

    Raises:
        CheckpointError: a value that ``torch.load(weights_only=True)`` could not read back.
    """
    memo = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
            raise CheckpointError(
                f"{what} at {_path or '<root>'} is a {type(obj).__name__} (a sharded tensor?); "
                "the full-state checkpoint format needs plain tensors; use a sharded payload."
            )
        key = alias_key(obj)
        if key not in memo:
            if buffers is not None:
                memo[key] = buffers.copy(f"{what}/{_path}", obj)
            else:
                memo[key] = obj.detach().cpu()
        return memo[key]
    if type(obj) in (dict, OrderedDict):
        return type(obj)(
            (
                k,
                snapshot(
                    v, what=what, buffers=buffers, _path=f"{_path}.{k}".lstrip("."), _memo=memo
                ),
            )
            for k, v in obj.items()
        )
    if type(obj) in (list, tuple):
        return type(obj)(
            snapshot(v, what=what, buffers=buffers, _path=f"{_path}[{i}]", _memo=memo)
            for i, v in enumerate(obj)
        )
    if isinstance(obj, torch.Size) or type(obj) in _SAFE_LEAVES:
        return obj
    raise CheckpointError(
        f"{what} at {_path or '<root>'} holds a {type(obj).__module__}.{type(obj).__name__}, "
        "which cannot be stored without pickle; keep state_dict() values to tensors, numbers, "
        "strings and containers of them."
    )


def split_tensors(obj: Any, _path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(the structure with each tensor replaced by a marker string, {marker key: tensor}).

    The structure is small and goes through ``torch.save``; the tensors go to safetensors,
    which is streamed without zip records or CRCs and read back without pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return _TENSOR_MARK + path
        if isinstance(node, dict):
            return type(node)((k, walk(v, f"{path}.{k}".lstrip("."))) for k, v in node.items())
        if type(node) in (list, tuple):
            return type(node)(walk(v, f"{path}[{i}]") for i, v in enumerate(node))
        return node

    return walk(obj, _path), tensors


def tensor_markers(skeleton: Any) -> list[str]:
    """The tensor names a structure of :func:`split_tensors` refers to, in order."""
    if isinstance(skeleton, str):
        return [skeleton[len(_TENSOR_MARK) :]] if skeleton.startswith(_TENSOR_MARK) else []
    if isinstance(skeleton, dict):
        return [m for value in skeleton.values() for m in tensor_markers(value)]
    if isinstance(skeleton, (list, tuple)):
        return [m for value in skeleton for m in tensor_markers(value)]
    return []


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, str) and skeleton.startswith(_TENSOR_MARK):
        return tensors[skeleton[len(_TENSOR_MARK) :]]
    if isinstance(skeleton, dict):
        return type(skeleton)((k, join_tensors(v, tensors)) for k, v in skeleton.items())
    if type(skeleton) in (list, tuple):
        return type(skeleton)(join_tensors(v, tensors) for v in skeleton)
    return skeleton
