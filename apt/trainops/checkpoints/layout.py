"""Names on disk: step folders, stage folders, the LATEST pointer, debris and quarantine.

::

    <save_dir>/step-000001200/          a checkpoint, once its MANIFEST.json is in place
    <save_dir>/LATEST                   name of the newest committed checkpoint
    <save_dir>/.tmp-step-000001400/     a save in progress (debris if the writer died)
    <save_dir>/.tmp-replaced-step-.../  an older folder of the same step, moved aside
    <save_dir>/.tmp-delete-step-.../    a folder retention is deleting
    <save_dir>/.corrupt-step-.../       a checkpoint that failed verification, kept for a person

Everything named ``.tmp-*`` is debris once no save is in flight: :func:`clean_debris` removes it,
except that a moved-aside folder whose replacement never arrived is put back first.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from apt.trainops.checkpoints.fsio import atomic_write_text, fsync_dir

__all__ = [
    "LATEST_FILE",
    "MANIFEST_FILE",
    "TRAINER_STATE_FILE",
    "clean_debris",
    "committed_dirs",
    "parse_step",
    "quarantine",
    "read_latest",
    "remove_dir",
    "replaced_dir",
    "rng_file",
    "stage_dir",
    "step_dir",
    "step_dir_name",
    "write_latest",
]

log = logging.getLogger(__name__)

LATEST_FILE = "LATEST"
MANIFEST_FILE = "MANIFEST.json"
TRAINER_STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^(?:step-|checkpoint-)?(\d+)$")
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_REPLACED_RE = re.compile(r"^\.tmp-replaced-(step-\d+)$")


def step_dir_name(step: int) -> str:
    """``1200`` -> ``'step-000001200'``."""
    return f"step-{step:09d}"


def rng_file(rank: int) -> str:
    """A rank's RNG files in a checkpoint, without the ``.json``/``.safetensors`` suffix."""
    return f"rng/rank-{rank:05d}"


def step_dir(save_dir: Path, step: int) -> Path:
    """The folder of the checkpoint of ``step``."""
    return save_dir / step_dir_name(step)


def stage_dir(save_dir: Path, step: int) -> Path:
    """The folder a save of ``step`` is written into before its rename."""
    return save_dir / f"{TMP_PREFIX}{step_dir_name(step)}"


def replaced_dir(save_dir: Path, step: int) -> Path:
    """Where an existing folder of ``step`` waits while a new save of ``step`` takes its name."""
    return save_dir / f"{TMP_PREFIX}replaced-{step_dir_name(step)}"


def parse_step(name_or_step: int | str) -> int | None:
    """The step of ``1000``, ``'1000'``, ``'checkpoint-1000'`` or ``'step-000001000'``."""
    if isinstance(name_or_step, int):
        return name_or_step if name_or_step >= 0 else None
    match = _NAME_RE.match(name_or_step.strip())
    return int(match.group(1)) if match else None


def committed_dirs(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder with a MANIFEST.json, by step (not verified)."""
    if not save_dir.is_dir():
        return []
    found = []
    for entry in save_dir.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and (entry / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def read_latest(save_dir: Path) -> str | None:
    """The name LATEST holds, or None."""
    try:
        return (save_dir / LATEST_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_latest(save_dir: Path, name: str) -> None:
    """Point LATEST at ``name`` (atomic replace, fsynced)."""
    atomic_write_text(save_dir / LATEST_FILE, name + "\n")


def remove_dir(path: Path) -> None:
    """Delete a folder so it is never seen half-deleted: rename to ``.tmp-delete-*``, then rm."""
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def quarantine(path: Path) -> Path:
    """Move a bad checkpoint out of the way as ``.corrupt-<name>``; return the new path."""
    target = path.with_name(f".corrupt-{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f".corrupt-{path.name}-{n}")
    path.rename(target)
    fsync_dir(path.parent)
    return target


def clean_debris(save_dir: Path) -> list[Path]:
    """Remove every ``.tmp-*`` entry; call only when no save of this directory is in flight.

    A moved-aside folder (``.tmp-replaced-step-N``) whose step folder is missing is a good
    checkpoint whose replacement never arrived: it is renamed back, not deleted.

    Returns:
        The entries removed.
    """
    if not save_dir.is_dir():
        return []
    removed = []
    for entry in sorted(save_dir.iterdir()):
        match = _REPLACED_RE.match(entry.name)
        if match and not (save_dir / match.group(1)).exists():
            entry.rename(save_dir / match.group(1))
            fsync_dir(save_dir)
            log.warning(
                "restored %s: the save that was replacing it never finished",
                save_dir / match.group(1),
            )
            continue
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed checkpoint debris: %s", ", ".join(p.name for p in removed))
    return removed
