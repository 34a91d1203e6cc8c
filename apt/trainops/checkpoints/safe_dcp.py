"""DCP readers that never unpickle arbitrary objects from a checkpoint.

torch.distributed.checkpoint stores its ``.metadata`` as a pickle and reads non-tensor values
(optimizer hyper-parameters, parameter names) with an unrestricted ``torch.load``: loading a
tampered checkpoint could run code. These two replacements keep DCP's formats and behaviour but
accept only what a DCP checkpoint legitimately contains.

The reader also opens files only inside its DCP folder: ``.metadata`` names, for every chunk,
the file it lies in, and a name such as ``../../elsewhere/__0_0.distcp`` or an absolute path is
refused (:func:`read_dcp_metadata` checks them all before anything is read, and every open goes
through :func:`~apt.trainops.checkpoints.fsio.open_inside`). A truncated or garbled ``.metadata``
is a :class:`CheckpointError`, not a pickle traceback.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.fsio import check_relpath, open_inside, refused

__all__ = [
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "check_storage",
    "check_storage_sizes",
    "read_dcp_metadata",
    "storage_files",
]

# DCP metadata is a pickle; these are the only globals a DCP .metadata file refers to.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "StorageMeta",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise CheckpointError(
            f"DCP metadata refers to {module}.{name}, which a checkpoint never needs; the file "
            "is corrupt or was not written by torch.distributed.checkpoint. Not loading it."
        )


def _garbled(where: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: not a valid DCP metadata file: {why}")


def read_dcp_metadata(folder: Path, name: str = ".metadata") -> Metadata:
    """Unpickle ``folder/name`` with DCP's own classes only, and check its structure.

    Raises:
        CheckpointError: refused (a link, not a regular file), truncated or garbled, another
            class than DCP's ``Metadata``, or a chunk stored in a file outside ``folder``.
        FileNotFoundError: no such file.
    """
    where = folder / name
    with open_inside(folder, name) as stream:
        try:
            metadata = _MetadataUnpickler(stream).load()
        except CheckpointError:
            raise
        except Exception as exc:  # a damaged pickle raises almost anything; all mean "garbled"
            raise _garbled(where, f"truncated or garbled ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise _garbled(where, f"it holds a {type(metadata).__name__}, not DCP's Metadata")
    if not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise _garbled(where, "state_dict_metadata is missing or not a dict")
    check_storage(metadata, where)
    return metadata


def check_storage(metadata: Metadata, where: Path) -> None:
    """Every chunk's file is a plain relative name (no ``..``, not absolute), and its byte
    range is made of non-negative integers.

    Raises:
        CheckpointError: naming the chunk and the file it names.
    """
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict):
        raise _garbled(where, "storage_data is missing or not a dict")
    for index, info in storage.items():
        if not isinstance(info, _StorageInfo):
            raise _garbled(where, f"chunk {index}: a {type(info).__name__}, not _StorageInfo")
        rel = getattr(info, "relative_path", None)
        why = check_relpath(rel)
        if why is not None:
            raise refused(where, f"chunk {getattr(index, 'fqn', index)} is stored in {why}")
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)
        ):
            raise _garbled(where, f"chunk {getattr(index, 'fqn', index)}: offset/length not >= 0")


def storage_files(metadata: Metadata) -> dict[str, int]:
    """``{file: bytes it must hold at least}`` over every chunk of checked ``metadata``."""
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    return need


def check_storage_sizes(metadata: Metadata, sizes: Mapping[str, int | None], where: Path) -> None:
    """Every chunk's file exists (``sizes[file]`` not None) and is long enough for its range.

    Raises:
        CheckpointError: naming the file that is missing or too short.
    """
    for rel, need in sorted(storage_files(metadata).items()):
        size = sizes.get(rel)
        if size is None:
            raise _garbled(where, f"a chunk is stored in {rel}, which is not in the checkpoint")
        if size < need:
            raise _garbled(where, f"a chunk ends at byte {need} of {rel}, which holds {size}")


class _ConfinedFileSystem(FileSystem):
    """DCP's local file system, opening only regular files inside one folder, read-only."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> Path:
        if Path(path) != self.root:
            raise refused(Path(path) / suffix, f"it is outside the DCP folder {self.root}")
        why = check_relpath(suffix)
        if why is not None:
            raise refused(self.root, f"DCP asked for a file at {why}")
        return self.root / suffix

    @contextmanager
    def create_stream(  # type: ignore[override]
        self, path: str | os.PathLike[str], mode: str
    ) -> Iterator[io.IOBase]:
        if mode != "rb":
            raise CheckpointError(f"{path}: a checkpoint is read, never written, when loading")
        with open_inside(self.root, Path(path).relative_to(self.root).as_posix()) as fh:
            yield fh  # type: ignore[misc]


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader whose ``.metadata`` unpickler accepts DCP's own classes only, and
    which opens only regular files inside its folder."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.fs = _ConfinedFileSystem(Path(self.path))

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        super().reset(checkpoint_id)
        self.fs = _ConfinedFileSystem(Path(self.path))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_dcp_metadata(Path(self.path), name)
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, *args: Any, **kwargs: Any) -> None:
        check_storage(metadata, Path(self.path) / ".metadata")
        super().set_up_storage_reader(metadata, *args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading non-tensor values with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
