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
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from apt.core.errors import CheckpointError
from apt.core.version import __version__
from apt.trainops.checkpoints.fsio import FileRecord, StageFiles, dumps_json, hash_file
from apt.trainops.checkpoints.layout import MANIFEST_FILE
from apt.trainops.checkpoints.parts import saved_parts

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Manifest",
    "VerifiedCheckpoint",
    "read_manifest",
    "verify_checkpoint",
    "write_manifest",
]

FORMAT = "apt-checkpoint"
FORMAT_VERSION = 2


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


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint folder whose every file matched its manifest.

    Readers open files through :meth:`file`, so nothing outside the manifest is ever read.
    """

    path: Path
    manifest: Manifest

    def file(self, rel: str) -> Path | None:
        """``path/rel`` if the manifest lists it, else None."""
        return self.path / rel if rel in self.manifest.files else None


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


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Parse and sanity-check ``ckpt_dir/MANIFEST.json`` (files are not hashed here).

    Raises:
        CheckpointError: missing, not JSON, another format or a newer version, a step that does
            not match the folder, or a file path that leaves the folder.
    """
    try:
        doc = json.loads((ckpt_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _bad(ckpt_dir, "missing (an incomplete save?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(ckpt_dir, f"unreadable or not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _bad(ckpt_dir, f"not an APT checkpoint manifest (format != {FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise _bad(
            ckpt_dir,
            f"format_version {version!r}; this APT reads up to "
            f"{FORMAT_VERSION}: upgrade APT to load it",
        )
    try:
        files = {
            str(rel): FileRecord(size=int(rec["size"]), sha256=str(rec["sha256"]))
            for rel, rec in doc["files"].items()
        }
        manifest = Manifest(
            step=int(doc["step"]),
            sequence=int(doc["sequence"]),
            created=str(doc["created"]),
            files=files,
            metrics=dict(doc.get("metrics") or {}),
            world_size=int(doc.get("world_size", 1)),
            format_version=version,
            parts=_parts(doc.get("parts")) if version >= 2 else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _bad(ckpt_dir, f"malformed ({type(exc).__name__}: {exc})") from None
    for rel in files:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel == MANIFEST_FILE:
            raise _bad(ckpt_dir, f"lists an invalid file path {rel!r}")
    return manifest


def _parts(raw: Any) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict) or not all(
        isinstance(rec, dict) and rec.get("kind") in ("module", "optimizer", "state")
        for rec in raw.values()
    ):
        raise TypeError(f"parts must map names to {{'kind': ...}} records, not {raw!r}")
    return {str(name): {str(k): str(v) for k, v in rec.items()} for name, rec in raw.items()}


def verify_checkpoint(ckpt_dir: Path, expected_step: int | None = None) -> VerifiedCheckpoint:
    """Check the manifest and the size and sha256 of every file it lists.

    Raises:
        CheckpointError: naming the first bad file with expected vs actual size or sha256.
    """
    manifest = read_manifest(ckpt_dir)
    if expected_step is not None and manifest.step != expected_step:
        raise _bad(ckpt_dir, f"says step {manifest.step}, the folder is step {expected_step}")
    for rel, want in sorted(manifest.files.items()):
        path = ckpt_dir / rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: missing (the manifest expects {want.size} bytes)"
            ) from None
        if size != want.size:
            raise CheckpointError(
                f"{path}: expected size {want.size} bytes, found {size} (truncated or altered)"
            )
        got = hash_file(path)
        if got.sha256 != want.sha256:
            raise CheckpointError(
                f"{path}: expected sha256 {want.sha256}, found {got.sha256} (corrupted)"
            )
    return VerifiedCheckpoint(path=ckpt_dir, manifest=manifest)
