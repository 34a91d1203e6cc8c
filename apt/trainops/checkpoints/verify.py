"""Verifying a checkpoint before anything is loaded: its files, their hashes, their content.

:func:`verify_checkpoint` checks, in this order, and reports the first fault as a
:class:`CheckpointError` naming the file (and the field, where there is one):

1. the manifest parses, with the right types (:func:`~.manifest.read_manifest`);
2. it lists every file the checkpoint cannot be without (:func:`required_files`);
3. every listed file is a regular file inside the folder (no symbolic link, FIFO, folder, path
   with ``..``: :func:`~.fsio.open_inside`) with the listed size and sha256;
4. what the loader will parse is well formed (:func:`check_content`): JSON files are JSON, the
   trainer state is an object, RNG files hold RNG states, every safetensors header is
   consistent, every ``.pt`` structure loads with ``weights_only`` and finds its tensors, every
   DCP ``.metadata`` unpickles safely and stores its chunks in listed files of the same folder.

A checkpoint that passes all four can still not fit the objects given to load it into; that is
checked by :func:`~.restore.check_fits` (a :class:`~.errors.CheckpointMismatchError`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.fsio import hash_inside
from apt.trainops.checkpoints.layout import MANIFEST_FILE, TRAINER_STATE_FILE, rng_file
from apt.trainops.checkpoints.manifest import Manifest, VerifiedCheckpoint, read_manifest
from apt.trainops.checkpoints.parts import part_file, part_folder
from apt.trainops.checkpoints.rng import rng_json_problem, rng_tensors_problem
from apt.trainops.checkpoints.tensorio import tensor_markers

__all__ = ["check_content", "required_files", "verify_checkpoint"]

_RNG_JSON = re.compile(r"^rng/rank-\d{5}\.json$")
_DCP_METADATA = re.compile(r"^(.*/)?(\.metadata|__\d+\.metadata)$")


def verify_checkpoint(ckpt_dir: Path, expected_step: int | None = None) -> VerifiedCheckpoint:
    """Check the manifest, the files it must list, every file's size and sha256, and content.

    Raises:
        CheckpointError: naming the first bad file with expected vs actual size or sha256, the
            reason a file is refused, or the field that is malformed.
    """
    manifest = read_manifest(ckpt_dir)
    if expected_step is not None and manifest.step != expected_step:
        raise CheckpointError(
            f"{ckpt_dir / MANIFEST_FILE}: says step {manifest.step}, the folder is step "
            f"{expected_step}"
        )
    for alternatives in required_files(manifest):
        if not any(rel in manifest.files for rel in alternatives):
            raise CheckpointError(
                f"{ckpt_dir / alternatives[0]}: not listed in the manifest, and a checkpoint "
                "cannot be without it"
            )
    for rel, want in sorted(manifest.files.items()):
        path = ckpt_dir / rel
        try:
            got = hash_inside(ckpt_dir, rel, expected_size=want.size)
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: missing (the manifest expects {want.size} bytes)"
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
        if got.size != want.size:
            raise CheckpointError(
                f"{path}: expected size {want.size} bytes, found {got.size} (truncated or altered)"
            )
        if got.sha256 != want.sha256:
            raise CheckpointError(
                f"{path}: expected sha256 {want.sha256}, found {got.sha256} (corrupted)"
            )
    ckpt = VerifiedCheckpoint(path=ckpt_dir, manifest=manifest)
    check_content(ckpt)
    return ckpt


def required_files(manifest: Manifest) -> Iterator[tuple[str, ...]]:
    """The files the manifest must list, each as its alternatives (one of them must be there).

    The trainer state; both RNG files of every rank that saved; and the main file of every part
    (its whole-state file or its DCP ``.metadata``); format version 1, which had no parts,
    always held the model. Lazy: a ``world_size`` of a billion costs nothing once a file is
    found missing.
    """
    yield (TRAINER_STATE_FILE,)
    if manifest.parts is None:
        yield ("model/model.safetensors", "model/.metadata")
    for name, rec in (manifest.parts or {}).items():
        kind = rec["kind"]
        main = part_file(name, kind, ".safetensors" if kind == "module" else ".pt")
        yield (main,) if kind == "state" else (main, f"{part_folder(name, kind)}/.metadata")
    for rank in range(manifest.world_size):
        yield (f"{rng_file(rank)}.json",)
        yield (f"{rng_file(rank)}.safetensors",)


def _check_structure(ckpt: VerifiedCheckpoint, rel: str) -> None:
    markers = tensor_markers(ckpt.read_structure(rel))
    if not markers:
        return
    tensors_rel = rel.removesuffix(".pt") + ".safetensors"
    if ckpt.file(tensors_rel) is None:
        raise CheckpointError(
            f"{ckpt.path / rel}: refers to {len(markers)} tensor(s), but {tensors_rel} is not in "
            "the checkpoint"
        )
    missing = sorted(set(markers) - set(ckpt.tensor_entries(tensors_rel)))
    if missing:
        raise CheckpointError(
            f"{ckpt.path / rel}: refers to tensors {missing[:5]} that {tensors_rel} lacks"
        )


def _check_rng(ckpt: VerifiedCheckpoint, rel: str) -> None:
    plain = ckpt.read_json(rel)
    problem = rng_json_problem(plain)
    if problem is not None:
        raise CheckpointError(f"{ckpt.path / rel}: not an RNG state: {problem}")
    tensors_rel = rel.removesuffix(".json") + ".safetensors"
    if ckpt.file(tensors_rel) is None:
        return  # a rank's RNG files are required only for ranks that saved (required_files)
    entries = {name: (e.dtype, e.shape) for name, e in ckpt.tensor_entries(tensors_rel).items()}
    problem = rng_tensors_problem(entries, plain.get("cuda_devices", 0))
    if problem is not None:
        raise CheckpointError(f"{ckpt.path / tensors_rel}: not an RNG state: {problem}")


def check_content(ckpt: VerifiedCheckpoint) -> None:
    """Check the content of every file the loader parses (see the module docstring, step 4).

    Raises:
        CheckpointError: naming the file and the field or tensor that is malformed.
    """
    files = ckpt.manifest.files
    for rel in sorted(files):
        if rel == TRAINER_STATE_FILE:
            state = ckpt.read_json(rel)
            if not isinstance(state, dict):
                raise CheckpointError(
                    f"{ckpt.path / rel}: must be a JSON object, found a {type(state).__name__}"
                )
        elif _RNG_JSON.match(rel):
            _check_rng(ckpt, rel)
        elif rel.endswith(".json"):
            ckpt.read_json(rel)
        elif rel.endswith(".safetensors"):
            ckpt.tensor_entries(rel)
        elif rel.endswith(".pt"):
            _check_structure(ckpt, rel)
        elif match := _DCP_METADATA.match(rel):
            # torch.distributed.checkpoint is imported only for checkpoints that hold DCP shards
            from apt.trainops.checkpoints.safe_dcp import check_storage_sizes, read_dcp_metadata

            prefix = match.group(1) or ""
            metadata = read_dcp_metadata(ckpt.path / prefix, match.group(2))
            sizes = {
                f.removeprefix(prefix): r.size for f, r in files.items() if f.startswith(prefix)
            }
            check_storage_sizes(metadata, sizes, ckpt.path / rel)
