"""Finding and reading checkpoints: name resolution, newest-good fallback, reading into objects.

Nothing here writes a checkpoint. The only change it makes on disk is moving a checkpoint that
failed verification aside (``.corrupt-step-N``), and only when asked to (the writer rank).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.layout import (
    TRAINER_STATE_FILE,
    committed_dirs,
    parse_step,
    quarantine,
    rng_file,
    step_dir,
)
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint, read_manifest, verify_checkpoint
from apt.trainops.checkpoints.parts import Part, check_loadable
from apt.trainops.checkpoints.payload import Payload
from apt.trainops.checkpoints.rng import join_rng_state, restore_rng_state
from apt.trainops.checkpoints.tensorio import read_safetensors

__all__ = [
    "LoadedCheckpoint",
    "newest_good_checkpoint",
    "read_checkpoint",
    "read_trainer_state",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What a load read besides the objects it loaded into.

    Attributes:
        step: the step the checkpoint was saved at.
        path: its folder.
        trainer_state: the ``trainer_state`` dict given to ``save`` (``{}`` if none).
        metrics: the ``metrics`` dict given to ``save``.
        rng_state: this rank's RNG state (for :func:`restore_rng_state`), or None when the
            checkpoint has none for this rank (it was written with fewer processes).
    """

    step: int
    path: Path
    trainer_state: dict[str, Any]
    metrics: dict[str, Any]
    rng_state: dict[str, Any] | None


def resolve_checkpoint(save_dir: Path, name_or_step: int | str | Path) -> Path:
    """The folder of ``1000``, ``'checkpoint-1000'``, ``'step-000001000'`` or a folder path.

    Raises:
        CheckpointError: no such checkpoint (lists the ones there are).
    """
    step = None if isinstance(name_or_step, Path) else parse_step(name_or_step)
    if step is not None:
        if step_dir(save_dir, step).is_dir():
            return step_dir(save_dir, step)
    elif not isinstance(name_or_step, int) and Path(name_or_step).is_dir():
        return Path(name_or_step)
    names = [p.name for _, p in committed_dirs(save_dir)]
    raise CheckpointError(
        f"no checkpoint {name_or_step!r} in {save_dir}; available: "
        f"{', '.join(names) if names else 'none'}"
    )


def newest_good_checkpoint(save_dir: Path, *, quarantine_bad: bool) -> VerifiedCheckpoint | None:
    """The most recently committed checkpoint that verifies, or None.

    Every bad one met on the way (and any with an unreadable manifest) is reported: a warning
    naming the fault and the fall-back, plus a move to ``.corrupt-*`` when ``quarantine_bad``.
    """
    infos: list[tuple[int, int, Path]] = []
    bad: list[tuple[Path, CheckpointError]] = []
    for step, path in committed_dirs(save_dir):
        try:
            infos.append((read_manifest(path).sequence, step, path))
        except CheckpointError as exc:
            bad.append((path, exc))
    good = None
    for _, step, path in sorted(infos, reverse=True):
        try:
            good = verify_checkpoint(path, expected_step=step)
            break
        except CheckpointError as exc:
            bad.append((path, exc))
    fallback = good.path.name if good else "nothing (no good checkpoint left)"
    for path, why in bad:
        if not quarantine_bad:
            log.debug("skipping bad checkpoint %s: %s", path, why)
            continue
        try:
            moved = f"; moved to {quarantine(path).name} for inspection"
        except OSError:
            moved = ""
        log.warning(
            "CHECKPOINT %s IS CORRUPT OR INCOMPLETE and was skipped: %s. Falling back to %s%s",
            path.name,
            why,
            fallback,
            moved,
        )
    return good


def read_trainer_state(ckpt: VerifiedCheckpoint) -> dict[str, Any]:
    """The ``trainer_state`` given to ``save`` (``{}`` if none) of a verified checkpoint."""
    state_path = ckpt.file(TRAINER_STATE_FILE)
    return json.loads(state_path.read_text("utf-8")) if state_path else {}


def read_checkpoint(
    ckpt: VerifiedCheckpoint,
    payload: Payload,
    parts: list[Part],
    *,
    rank: int,
    map_location: str,
    restore_rng: bool,
) -> LoadedCheckpoint:
    """Load a verified checkpoint into ``parts`` and read its trainer state and RNG.

    Raises:
        CheckpointError: a part the checkpoint does not hold, or state that does not fit.
    """
    check_loadable(parts, ckpt.manifest.saved_parts(), str(ckpt.path))
    payload.load(ckpt, parts, map_location=map_location)
    trainer_state = read_trainer_state(ckpt)
    plain = ckpt.file(f"{rng_file(rank)}.json")
    tensors = ckpt.file(f"{rng_file(rank)}.safetensors")
    rng_state = None
    if plain and tensors:
        rng_state = join_rng_state(
            json.loads(plain.read_text("utf-8")), read_safetensors(tensors, device="cpu")[0]
        )
        if restore_rng:
            restore_rng_state(rng_state)
    else:
        log.warning(
            "%s has no RNG state for rank %d (saved by %d process(es)); random streams "
            "will not continue exactly",
            ckpt.path.name,
            rank,
            ckpt.manifest.world_size,
        )
    log.info("loaded checkpoint %s (step %d)", ckpt.path, ckpt.manifest.step)
    return LoadedCheckpoint(
        step=ckpt.manifest.step,
        path=ckpt.path,
        trainer_state=trainer_state,
        metrics=ckpt.manifest.metrics,
        rng_state=rng_state,
    )
