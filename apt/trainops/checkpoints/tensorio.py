"""Tensors in and out of a checkpoint: CPU snapshots, clean names, a streaming safetensors writer.

* :func:`snapshot` copies a nested state (dicts, lists, tensors) to CPU memory. For an async
  save it copies into buffers kept between saves (pinned for CUDA tensors, with non-blocking
  copies), so the time the training loop is blocked is one memcpy, not an allocation storm.
  It also refuses, at save time, any value ``torch.load(weights_only=True)`` would refuse later.
* :func:`clean_state_names` removes the names wrappers add (``_orig_mod.`` from torch.compile,
  and friends), so a compiled model's checkpoint loads into a plain one and back.
* :func:`write_safetensors` streams tensors into a safetensors file without building the file in
  memory; tensors that alias the same memory (tied weights) are written once and recorded as
  aliases in the metadata, which :func:`read_safetensors` expands again.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from apt.core.errors import CheckpointError

__all__ = [
    "SnapshotBuffers",
    "clean_name",
    "clean_state_names",
    "join_tensors",
    "read_safetensors",
    "snapshot",
    "split_tensors",
    "write_safetensors",
]

# Segments wrappers insert into parameter names: torch.compile, activation checkpointing, FSDP1.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

_ALIASES_KEY = "apt_aliases"
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


def _alias_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


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
        key = _alias_key(obj)
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


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, str) and skeleton.startswith(_TENSOR_MARK):
        return tensors[skeleton[len(_TENSOR_MARK) :]]
    if isinstance(skeleton, dict):
        return type(skeleton)((k, join_tensors(v, tensors)) for k, v in skeleton.items())
    if type(skeleton) in (list, tuple):
        return type(skeleton)(join_tensors(v, tensors) for v in skeleton)
    return skeleton


def write_safetensors(
    write: Callable[[Any], Any], tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Stream ``tensors`` in safetensors format through ``write`` (a file's write method).

    Exact aliases (same memory, shape, stride, dtype: tied weights) are written once; the other
    names are recorded in the metadata and expanded by :func:`read_safetensors`.
    """
    first_name: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    unique: list[tuple[str, torch.Tensor]] = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, not storable")
        key = _alias_key(t)
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
            unique.append((name, t))
    header: dict[str, Any] = {}
    offset = 0
    for name, t in unique:
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    meta = dict(metadata)
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    write(struct.pack("<Q", len(raw)))
    write(raw)
    for _, t in unique:
        if t.numel():
            write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def read_safetensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a file written by :func:`write_safetensors`: (tensors with aliases expanded, meta)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    tensors = load_file(str(path), device=device)
    for alias, source in json.loads(meta.pop(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[source]
    return tensors, meta
