"""MANIFEST.json: what a checkpoint holds, written last, checked before anything is loaded.

::

    {"format": "apt-checkpoint", "format_version": 2,
     "step": 1200, "sequence": 7,              # sequence: commit order within the save_dir
     "created": "2025-01-01T12:00:00.000000+00:00",
     "world_size": 1, "apt_version": "...", "torch_version": "...",
     "metrics": {"val_loss": 2.31},
     "parts": {"model": {"kind": "module"},
               "optimizer": {"kind": "optimizer", "module": "model"},
               "lr_scheduler": {"kind": "state"}, ...},
     "files": {"model/model.safetensors": {"size": 497764424, "sha256": "..."}, ...}}

``sequence`` orders checkpoints by when they were committed, so "newest" stays right when a run
re-saves an older step after falling back (the highest step is not always the newest).
``parts`` (new in version 2) names the stateful parts saved; a version-1 manifest has none, and
its parts are recognised by their files (:func:`~apt.trainops.checkpoints.parts.saved_parts`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apt.core.errors import CheckpointError
from apt.core.version import __version__
from apt.trainops.checkpoints.fsio import (
    FileRecord,
    StageFiles,
    check_relpath,
    dumps_json,
    open_inside,
    read_inside,
)
from apt.trainops.checkpoints.layout import MANIFEST_FILE
from apt.trainops.checkpoints.parts import saved_parts
from apt.trainops.checkpoints.safetensors_file import (
    TensorEntry,
    expand_aliases,
    read_safetensors,
    safetensors_entries,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "JSON_LIMIT",
    "Manifest",
    "VerifiedCheckpoint",
    "loads_json",
    "read_manifest",
    "write_manifest",
]

FORMAT = "apt-checkpoint"
FORMAT_VERSION = 2
#: The largest JSON file of a checkpoint that is read (manifest, trainer state, RNG state).
JSON_LIMIT = 64 << 20
_PART_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class _FileDoc(BaseModel):
    """One entry of ``files``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _PartDoc(BaseModel):
    """One entry of ``parts``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Literal["module", "optimizer", "state"]
    module: str | None = None


class _ManifestDoc(BaseModel):
    """The fields of MANIFEST.json that are read (strict: a string step is an error)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    step: int = Field(ge=0)
    sequence: int = Field(ge=0)
    created: str
    world_size: int = Field(1, ge=1)
    metrics: dict[str, Any] = Field(default_factory=dict)
    parts: dict[str, _PartDoc] | None = None
    files: dict[str, _FileDoc]


@dataclass(frozen=True)
class Manifest:
    """A parsed MANIFEST.json (see the module docstring for the fields)."""

    step: int
    sequence: int
    created: str
    files: dict[str, FileRecord]
    metrics: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    format_version: int = FORMAT_VERSION
    parts: dict[str, dict[str, str]] | None = None  # None in format version 1

    def saved_parts(self) -> dict[str, str]:
        """``{name: kind}`` of the parts this checkpoint holds (either format version)."""
        return saved_parts(self.parts, self.files)


def loads_json(data: bytes, where: Path) -> Any:
    """Parse JSON read from a checkpoint file.

    Raises:
        CheckpointError: not UTF-8, not JSON, or nested too deeply to parse.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise CheckpointError(f"{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint folder whose every file matched its manifest.

    Readers go through :meth:`open`, :meth:`read_json` and :meth:`read_tensors`, which read only
    files the manifest lists, and only as regular files inside the folder
    (:func:`~apt.trainops.checkpoints.fsio.open_inside`).
    """

    path: Path
    manifest: Manifest

    def file(self, rel: str) -> Path | None:
        """``path/rel`` if the manifest lists it, else None."""
        return self.path / rel if rel in self.manifest.files else None

    def _listed(self, rel: str) -> str:
        if rel not in self.manifest.files:
            raise CheckpointError(f"{self.path}: {rel} is not in its manifest")
        return rel

    @contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        """The listed file ``rel``, open for reading (confined, see the class docstring)."""
        with open_inside(self.path, self._listed(rel)) as fh:
            yield fh

    def read_json(self, rel: str) -> Any:
        """The listed JSON file ``rel``, parsed (at most :data:`JSON_LIMIT` bytes)."""
        data = read_inside(self.path, self._listed(rel), limit=JSON_LIMIT)
        return loads_json(data, self.path / rel)

    def tensor_entries(self, rel: str) -> dict[str, TensorEntry]:
        """The checked header of the listed safetensors file ``rel``, tied names included."""
        path = self.path / rel
        with self.open(rel) as fh:
            entries, meta, _ = safetensors_entries(fh, os.fstat(fh.fileno()).st_size, path)
        aliases = expand_aliases(entries, meta, path)
        return {**entries, **{alias: entries[source] for alias, source in aliases.items()}}

    def read_tensors(self, rel: str, device: str) -> dict[str, torch.Tensor]:
        """The tensors of the listed safetensors file ``rel`` (aliases expanded)."""
        return read_safetensors(self.path / self._listed(rel), device, root=self.path)[0]

    def read_structure(self, rel: str, map_location: str = "cpu") -> dict[Any, Any]:
        """The listed ``.pt`` file ``rel``, read with ``torch.load(weights_only=True)``.

        Raises:
            CheckpointError: it does not load (not a torch file, or it needs pickle), or it is
                not a dict (every ``state_dict()`` is one).
        """
        with self.open(rel) as fh:
            try:
                state = torch.load(fh, map_location=map_location, weights_only=True)
            except Exception as exc:  # damaged bytes make torch.load raise almost anything
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise CheckpointError(
                    f"{self.path / rel}: cannot be read as a state ({type(exc).__name__}: {first})"
                ) from None
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{self.path / rel}: holds a {type(state).__name__}, not a state dict"
            )
        return state


def write_manifest(
    files: StageFiles,
    *,
    step: int,
    sequence: int,
    metrics: dict[str, Any],
    world_size: int,
    parts: dict[str, dict[str, str]],
) -> None:
    """Write ``MANIFEST.json`` into the stage folder, listing every file already there."""
    records = files.all_records()
    records.pop(MANIFEST_FILE, None)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "sequence": sequence,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "world_size": world_size,
        "apt_version": __version__,
        "torch_version": torch.__version__,
        "metrics": metrics,
        "parts": parts,
        "files": {rel: {"size": r.size, "sha256": r.sha256} for rel, r in records.items()},
    }
    path = files.root / MANIFEST_FILE
    with open(path, "wb") as fh:
        fh.write(dumps_json(doc))
        fh.flush()
        os.fsync(fh.fileno())


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path / MANIFEST_FILE}: {why}")


def _validation_message(exc: ValidationError) -> str:
    errors = exc.errors()
    lines = [
        f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']} (got {str(e.get('input'))[:60]!r})"
        for e in errors[:3]
    ]
    return "; ".join(lines) + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Parse and check ``ckpt_dir/MANIFEST.json`` (files are not hashed here).

    Raises:
        CheckpointError: missing, refused (a link, not a regular file), not JSON, another format
            or a newer version, a field of the wrong type (named), a part name that is not
            lower_snake_case, or a file path that could leave the folder.
    """
    try:
        data = read_inside(ckpt_dir, MANIFEST_FILE, limit=JSON_LIMIT)
    except FileNotFoundError:
        raise _bad(ckpt_dir, "missing (an incomplete save?)") from None
    except OSError as exc:
        raise _bad(ckpt_dir, f"unreadable ({exc})") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise _bad(ckpt_dir, f"unreadable or not valid JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(ckpt_dir, f"not an APT checkpoint manifest (format != {FORMAT!r})")
    version = doc.get("format_version")
    if (
        not isinstance(version, int)
        or isinstance(version, bool)
        or not 1 <= version <= FORMAT_VERSION
    ):
        raise _bad(
            ckpt_dir,
            f"format_version {version!r}; this APT reads up to "
            f"{FORMAT_VERSION}: upgrade APT to load it",
        )
    try:
        parsed = _ManifestDoc.model_validate(doc)
    except ValidationError as exc:
        raise _bad(ckpt_dir, f"malformed: {_validation_message(exc)}") from None
    for rel in parsed.files:
        why = check_relpath(rel) or ("it is the manifest itself" if rel == MANIFEST_FILE else None)
        if why is not None:
            raise _bad(ckpt_dir, f"lists an invalid file path {rel!r}: {why}")
    parts = _parts(parsed.parts, ckpt_dir) if version >= 2 else None
    return Manifest(
        step=parsed.step,
        sequence=parsed.sequence,
        created=parsed.created,
        files={rel: FileRecord(size=r.size, sha256=r.sha256) for rel, r in parsed.files.items()},
        metrics=parsed.metrics,
        world_size=parsed.world_size,
        format_version=version,
        parts=parts,
    )


def _parts(raw: dict[str, _PartDoc] | None, ckpt_dir: Path) -> dict[str, dict[str, str]]:
    if raw is None:
        raise _bad(ckpt_dir, "malformed: parts: missing (format version 2 lists its parts)")
    modules = {name for name, rec in raw.items() if rec.kind == "module"}
    for name, rec in raw.items():
        if not _PART_NAME.match(name):
            raise _bad(ckpt_dir, f"malformed: parts: {name!r} is not a lower_snake_case name")
        if rec.module is not None and (rec.kind != "optimizer" or rec.module not in modules):
            raise _bad(
                ckpt_dir, f"malformed: parts.{name}.module: {rec.module!r} is not a module part"
            )
    return {name: rec.model_dump(exclude_none=True) for name, rec in raw.items()}
