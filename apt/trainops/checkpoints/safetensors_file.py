"""The safetensors files of a checkpoint: a streaming writer and a reader that checks first.

* :func:`write_safetensors` streams tensors into a safetensors file without building the file in
  memory; tensors that alias the same memory (tied weights) are written once and recorded as
  aliases in the metadata, which :func:`read_safetensors` expands again.
* :func:`read_safetensors` reads one back through :func:`~.fsio.open_inside` (confined to the
  checkpoint folder) after :func:`safetensors_entries` has checked the whole header: every
  tensor's dtype, shape and byte range, contiguous and filling the file exactly, so a header
  that lies about sizes is a :class:`CheckpointError`, never a crash or a huge allocation.
  Tensors are copied out of a private mapping of the file: none stays backed by the file.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.fsio import open_inside

__all__ = [
    "TensorEntry",
    "alias_key",
    "expand_aliases",
    "read_safetensors",
    "safetensors_entries",
    "write_safetensors",
]

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

_FROM_NAME = {name: dtype for dtype, name in _DTYPES.items()}
#: The safetensors readers' own cap on the JSON header.
_MAX_HEADER = 100 << 20
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}

_ALIASES_KEY = "apt_aliases"


def alias_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for tensors that are exact aliases (same memory, dtype, shape, stride)."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


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
        key = alias_key(t)
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


class TensorEntry(NamedTuple):
    """One tensor of a safetensors header: dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _bad_file(where: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: not a valid safetensors file: {why}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, rec: Any, where: Path) -> TensorEntry:
    if not isinstance(rec, dict) or set(rec) != _ENTRY_KEYS:
        raise _bad_file(
            where, f"tensor {name!r}: the record must hold exactly {sorted(_ENTRY_KEYS)}"
        )
    dtype, shape, offsets = rec["dtype"], rec["shape"], rec["data_offsets"]
    if dtype not in _FROM_NAME:
        raise _bad_file(
            where, f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(_FROM_NAME)}"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _bad_file(where, f"tensor {name!r}: shape {shape!r} is not a list of sizes >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad_file(where, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    entry = TensorEntry(_FROM_NAME[dtype], tuple(shape), offsets[0], offsets[1])
    nbytes = math.prod(entry.shape) * entry.dtype.itemsize
    if entry.end - entry.begin != nbytes:
        raise _bad_file(
            where,
            f"tensor {name!r}: shape {shape} of {dtype} is {nbytes} bytes, its data_offsets "
            f"span {entry.end - entry.begin}",
        )
    return entry


def _header(fh: BinaryIO, size: int, where: Path) -> tuple[dict[str, Any], int]:
    """(the parsed JSON header, where the data section starts)."""
    if size < 8:
        raise _bad_file(where, f"{size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", fh.read(8))
    if length > min(size - 8, _MAX_HEADER):
        raise _bad_file(where, f"header length {length} exceeds the file ({size} bytes)")
    try:
        header = json.loads(fh.read(length))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _bad_file(where, f"the header is not JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _bad_file(where, "the header is not a JSON object")
    return header, 8 + length


def safetensors_entries(
    fh: BinaryIO, size: int, where: Path
) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and check a whole safetensors header, reading nothing past it.

    Args:
        fh: the file, at offset 0. size: its size in bytes. where: its path, for messages.

    Returns:
        (entries by name, metadata, offset of the data section). Aliases (tied names) stay in
        the metadata; :func:`expand_aliases` resolves them.

    Raises:
        CheckpointError: naming the file and the tensor or field that is wrong: an unknown
            dtype, a shape whose bytes differ from its byte range, ranges that overlap, leave
            gaps or do not fill the file exactly.
    """
    header, start = _header(fh, size, where)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _bad_file(where, "__metadata__ must map strings to strings")
    entries = {name: _entry(name, rec, where) for name, rec in header.items()}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1][2:]):
        if entry.begin != end:
            raise _bad_file(
                where,
                f"tensor {name!r} starts at byte {entry.begin}, expected {end} (overlap or gap)",
            )
        end = entry.end
    if end != size - start:
        raise _bad_file(
            where, f"the tensors fill {end} bytes, the data section holds {size - start}"
        )
    return entries, meta, start


def expand_aliases(
    entries: dict[str, TensorEntry], meta: dict[str, str], where: Path
) -> dict[str, str]:
    """``{alias: stored name}`` from the metadata of :func:`write_safetensors` (``{}``: none).

    Raises:
        CheckpointError: the aliases are not JSON, name a tensor that is not stored, or hide a
            stored one.
    """
    try:
        aliases = json.loads(meta.get(_ALIASES_KEY, "{}"))
    except (ValueError, RecursionError):
        raise _bad_file(where, f"metadata {_ALIASES_KEY} is not JSON") from None
    if not isinstance(aliases, dict) or not all(
        isinstance(a, str) and a not in entries and src in entries for a, src in aliases.items()
    ):
        raise _bad_file(where, f"metadata {_ALIASES_KEY} must map new names to stored tensors")
    return aliases


def _read_entries(
    fh: BinaryIO, entries: dict[str, TensorEntry], start: int, device: str
) -> dict[str, torch.Tensor]:
    """Copy each checked byte range out of a private mapping of the file onto ``device``."""
    out: dict[str, torch.Tensor] = {}
    if not any(e.end > e.begin for e in entries.values()):
        return {n: torch.empty(e.shape, dtype=e.dtype, device=device) for n, e in entries.items()}
    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        for name, e in entries.items():
            if e.end == e.begin:
                out[name] = torch.empty(e.shape, dtype=e.dtype, device=device)
                continue
            raw = torch.frombuffer(
                mapped, dtype=torch.uint8, count=e.end - e.begin, offset=start + e.begin
            )
            owned = raw.to(device, copy=True)  # a fresh, aligned buffer the mapping can outlive
            del raw  # releases the buffer export, so the mapping can close
            out[name] = owned.view(e.dtype).reshape(e.shape)
    return out


def read_safetensors(
    path: Path, device: str, *, root: Path | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a file written by :func:`write_safetensors`: (tensors with aliases expanded, meta).

    Args:
        path: the file. device: where the tensors go.
        root: the checkpoint folder ``path`` lies in: every component between them is checked
            (:func:`~.fsio.open_inside`). Default: ``path``'s own folder.

    Raises:
        CheckpointError: the file is refused (a link, not a regular file) or its header is
            malformed (see :func:`safetensors_entries`).
    """
    root = path.parent if root is None else root
    with open_inside(root, path.relative_to(root).as_posix()) as fh:
        entries, meta, start = safetensors_entries(fh, os.fstat(fh.fileno()).st_size, path)
        aliases = expand_aliases(entries, meta, path)
        tensors = _read_entries(fh, entries, start, device)
    meta.pop(_ALIASES_KEY, None)
    for alias, source in aliases.items():
        tensors[alias] = tensors[source]
    return tensors, meta
