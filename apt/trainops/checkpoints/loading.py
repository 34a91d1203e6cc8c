"""Finding and reading checkpoints: name resolution, newest-good fallback, reading into objects.

Nothing here writes a checkpoint. The only change it makes on disk is moving a checkpoint that
failed verification aside (``.corrupt-step-N``), and only when asked to (the writer rank).

``load_latest`` tries the checkpoints newest commit first. One that fails
:func:`~.verify.verify_checkpoint` (a bad hash, a refused file, malformed content) or whose
trainer state ``before_load`` rejects with a :class:`CheckpointError` is corrupt: skipped with a
warning, and moved aside. One that verifies but does not fit the objects
(:class:`~.errors.CheckpointMismatchError`) is skipped the same way only if an older one fits;
if none does, the error is raised and nothing is moved, because then the objects changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.errors import CheckpointMismatchError
from apt.trainops.checkpoints.fsio import refused
from apt.trainops.checkpoints.layout import (
    MANIFEST_FILE,
    TRAINER_STATE_FILE,
    committed_dirs,
    parse_step,
    quarantine,
    rng_file,
    step_dir,
)
from apt.trainops.checkpoints.manifest import VerifiedCheckpoint, read_manifest
from apt.trainops.checkpoints.parts import Part
from apt.trainops.checkpoints.payload import Payload
from apt.trainops.checkpoints.restore import check_fits
from apt.trainops.checkpoints.rng import join_rng_state, restore_rng_state
from apt.trainops.checkpoints.verify import verify_checkpoint

__all__ = [
    "LoadedCheckpoint",
    "newest_good_checkpoint",
    "read_checkpoint",
    "read_trainer_state",
    "resolve_checkpoint",
    "verified_checkpoint",
]

log = logging.getLogger(__name__)

#: ``before_load(trainer_state, path)``: may raise CheckpointError to reject the checkpoint.
BeforeLoad = Callable[[dict[str, Any], Path], None]


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


def _linked(path: Path) -> CheckpointError | None:
    """The refusal of a checkpoint folder that is a symbolic link, or None."""
    if not path.is_symlink():
        return None
    return refused(path, f"the checkpoint folder is a symbolic link (to {path.readlink()})")


def resolve_checkpoint(save_dir: Path, name_or_step: int | str | Path) -> Path:
    """The folder of ``1000``, ``'checkpoint-1000'``, ``'step-000001000'`` or a folder path.

    A folder path is taken as given (a link to it is followed: the caller chose it); a step
    folder found by name in ``save_dir`` must not be a symbolic link.

    Raises:
        CheckpointError: no such checkpoint (lists the ones there are), or a linked step folder.
    """
    step = None if isinstance(name_or_step, Path) else parse_step(name_or_step)
    if step is not None:
        link = _linked(step_dir(save_dir, step))
        if link is not None:
            raise link
        if step_dir(save_dir, step).is_dir():
            return step_dir(save_dir, step)
    elif not isinstance(name_or_step, int) and Path(name_or_step).is_dir():
        return Path(name_or_step)
    names = [p.name for _, p in committed_dirs(save_dir)]
    raise CheckpointError(
        f"no checkpoint {name_or_step!r} in {save_dir}; available: "
        f"{', '.join(names) if names else 'none'}"
    )


def _candidates(save_dir: Path) -> tuple[list[tuple[int, Path]], list[tuple[Path, Exception]]]:
    """(step, folder) of the checkpoints, newest commit first; and the unreadable ones."""
    infos: list[tuple[int, int, Path]] = []
    bad: list[tuple[Path, Exception]] = []
    for step, path in committed_dirs(save_dir):
        try:
            link = _linked(path)
            if link is not None:
                raise link
            infos.append((read_manifest(path).sequence, step, path))
        except CheckpointError as exc:
            bad.append((path, exc))
    return [(step, path) for _, step, path in sorted(infos, reverse=True)], bad


def _report(bad: list[tuple[Path, Exception]], fallback: str, quarantine_bad: bool) -> None:
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


def _first_fit(
    candidates: list[tuple[int, Path]],
    parts: list[Part],
    before_load: BeforeLoad | None,
    bad: list[tuple[Path, Exception]],
    misfits: list[tuple[Path, Exception]],
) -> VerifiedCheckpoint | None:
    """The first candidate that verifies, passes ``before_load`` and fits; the others met on
    the way are appended to ``bad`` (corrupt) or ``misfits``."""
    for step, path in candidates:
        try:
            ckpt = verify_checkpoint(path, expected_step=step)
            if before_load is not None:
                before_load(read_trainer_state(ckpt), ckpt.path)
            check_fits(ckpt, parts)
        except CheckpointMismatchError as exc:
            misfits.append((path, exc))
        except CheckpointError as exc:
            bad.append((path, exc))
        else:
            return ckpt
    return None


def newest_good_checkpoint(
    save_dir: Path,
    parts: list[Part],
    *,
    quarantine_bad: bool,
    before_load: BeforeLoad | None = None,
) -> VerifiedCheckpoint | None:
    """The most recently committed checkpoint that verifies and fits ``parts``, or None.

    Every bad one met on the way is reported: a warning naming the fault and the fall-back,
    plus a move to ``.corrupt-*`` when ``quarantine_bad`` (see the module docstring).

    Raises:
        CheckpointMismatchError: no checkpoint fits ``parts``, though one verifies (the
            corrupt ones met are still reported and moved).
        Exception: what ``before_load`` raises other than a CheckpointError (the Trainer's
            ConfigError), after the corrupt ones met are reported.
    """
    candidates, bad = _candidates(save_dir)
    misfits: list[tuple[Path, Exception]] = []
    try:
        good = _first_fit(candidates, parts, before_load, bad, misfits)
    except Exception:
        _report(bad, "nothing (the load stopped on the error that follows)", quarantine_bad)
        raise
    if good is None and misfits:
        _report(bad, "nothing (no checkpoint fits the objects given)", quarantine_bad)
        newest, why = misfits[0]
        raise CheckpointMismatchError(
            f"no checkpoint in {save_dir} fits the objects given to load it into; the newest, "
            f"{newest.name}: {why}"
        )
    fallback = good.path.name if good else "nothing (no good checkpoint left)"
    _report(bad + misfits, fallback, quarantine_bad)
    return good


def read_trainer_state(ckpt: VerifiedCheckpoint) -> dict[str, Any]:
    """The ``trainer_state`` given to ``save`` (``{}`` if none) of a verified checkpoint.

    Raises:
        CheckpointError: the file is not a JSON object.
    """
    if ckpt.file(TRAINER_STATE_FILE) is None:
        return {}
    state = ckpt.read_json(TRAINER_STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{ckpt.path / TRAINER_STATE_FILE}: must be a JSON object, found a "
            f"{type(state).__name__}"
        )
    return state


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
        CheckpointMismatchError: a part the checkpoint does not hold, or state that does not
            fit (checked before anything is loaded).
        CheckpointError: state that does not fit, found while loading (parts may then be
            partly loaded).
    """
    check_fits(ckpt, parts)
    trainer_state = read_trainer_state(ckpt)
    plain = f"{rng_file(rank)}.json"
    tensors = f"{rng_file(rank)}.safetensors"
    rng_parts = None
    if ckpt.file(plain) and ckpt.file(tensors):  # read first: a failure leaves parts untouched
        rng_parts = ckpt.read_json(plain), ckpt.read_tensors(tensors, device="cpu")
    payload.load(ckpt, parts, map_location=map_location)
    rng_state = None
    if rng_parts is not None:
        rng_state = join_rng_state(*rng_parts)
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


def verified_checkpoint(path: Path) -> VerifiedCheckpoint:
    """The verified checkpoint ``path`` names: a step folder as it is; a checkpoints folder
    (or a run folder holding ``checkpoints/``) its newest checkpoint that verifies.

    Raises:
        CheckpointError: no such folder, no checkpoint there, or none that verifies.
    """
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such folder. Give a checkpoint step folder "
            "(<run>/checkpoints/step-000000040) or a checkpoints folder."
        )
    if (path / MANIFEST_FILE).exists():
        try:
            return verify_checkpoint(path)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}. Use another checkpoint of {path.parent}, or restore this one from "
                "a backup."
            ) from None
    if not committed_dirs(path) and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    committed = committed_dirs(path)
    if not committed:
        raise CheckpointError(
            f"{path}: no checkpoint in it (no step-* folder with a "
            f"{MANIFEST_FILE}). Give a checkpoint step folder or a checkpoints folder."
        )
    good = newest_good_checkpoint(path, [], quarantine_bad=False)
    if good is None:
        try:
            verify_checkpoint(committed[-1][1])
            why = "it does not verify"
        except CheckpointError as exc:
            why = str(exc)
        raise CheckpointError(
            f"{path}: none of its {len(committed)} checkpoint(s) verifies (the "
            f"newest, {committed[-1][1].name}: {why}); restore one from a backup"
        )
    skipped = [p.name for step, p in committed if step > good.manifest.step]
    if skipped:
        log.warning("skipped newer checkpoint(s) that do not verify: %s", ", ".join(skipped))
    return good
