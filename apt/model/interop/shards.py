"""Safetensors weights in the layout ``transformers`` reads: one ``model.safetensors``, or, past
a size, shards ``model-00001-of-0000N.safetensors`` and an index
``model.safetensors.index.json`` that names the shard of every tensor:

    {"metadata": {"total_size": BYTES},
     "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors", ...}}

Tensors are packed in order, each shard taking the next ones while they fit the size; a tensor
larger than the size gets a shard of its own (no tensor is ever split).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from apt.model.interop.errors import InteropError

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "is_weights_file",
    "parse_size",
    "plan_shards",
    "write_weights",
]

WEIGHTS_FILE = "model.safetensors"
#: The index of a sharded checkpoint: ``{"weight_map": {tensor name: shard file}}``.
INDEX_FILE = "model.safetensors.index.json"
#: The largest weights file :func:`plan_shards` plans when none is given (transformers' 4.x
#: default too).
DEFAULT_MAX_SHARD_SIZE = "5GB"

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?", re.IGNORECASE)
#: Decimal units like transformers' ("5GB" is 5 * 10**9 bytes); KiB .. TiB are binary.
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of a size: ``4096``, ``"500MB"``, ``"2GB"``, ``"1.5GiB"`` (KB, MB, GB, TB are
    powers of 1000, as in transformers; KiB .. TiB powers of 1024).

    Raises:
        InteropError: not a size, or not at least one byte.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        count = size
    else:
        match = _SIZE.fullmatch(str(size).strip())
        if match is None:
            raise InteropError(
                f"max shard size {size!r} is not a size; give bytes or a number with a unit, "
                "like 500MB, 2GB or 1.5GiB"
            )
        count = int(float(match[1]) * _UNITS[(match[2] or "b").lower()])
    if count < 1:
        raise InteropError(f"max shard size {size!r} is under one byte; give at least 1")
    return count


def plan_shards(sizes: dict[str, int], max_bytes: int) -> dict[str, list[str]]:
    """File name -> the tensors it holds, in the order of ``sizes`` (tensor name -> bytes).

    All of them in :data:`WEIGHTS_FILE` when they fit ``max_bytes``; else shards named as
    transformers names them.
    """
    groups: list[list[str]] = []
    used = max_bytes  # no open shard yet
    for name, size in sizes.items():
        if used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) <= 1:
        return {WEIGHTS_FILE: list(sizes)}
    n = len(groups)
    return {f"model-{i:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups, 1)}


def write_weights(
    folder: Path, files: dict[str, list[str]], tensor: Callable[[str], torch.Tensor]
) -> None:
    """Write the files of :func:`plan_shards` into ``folder``, and the index when there are
    shards; ``tensor(name)`` gives each tensor, made one file at a time (so only one shard's
    copy is held at once)."""
    weight_map: dict[str, str] = {}
    total = 0
    for file, names in files.items():
        tensors = {name: tensor(name) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def is_weights_file(name: str) -> bool:
    """Whether ``name`` is a weights file :func:`write_weights` may write (a re-export removes
    the ones it does not write again: stale shards would be read with the new ones)."""
    return name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD.fullmatch(name) is not None
