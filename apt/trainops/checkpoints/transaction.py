"""One save as a transaction: stage, write, commit, with every rank agreeing at each point.

::

    stage          writer: clean debris, mkdir <save_dir>/.tmp-step-N               | agree
    write          every rank: its payload files, its RNG; writer: trainer state    | agree
    commit         writer: MANIFEST.json, rename to step-N, fsync, LATEST, retention | agree

A checkpoint exists only once its folder has a MANIFEST.json, and the manifest is written after
every other file, so a crash at any point leaves either the previous state or the new one.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apt.trainops.checkpoints import faults
from apt.trainops.checkpoints.errors import CheckpointSaveError, human_bytes, save_error_from_os
from apt.trainops.checkpoints.fsio import StageFiles, dumps_json, fsync_dir
from apt.trainops.checkpoints.layout import (
    TRAINER_STATE_FILE,
    clean_debris,
    remove_dir,
    replaced_dir,
    rng_file,
    stage_dir,
    step_dir,
    write_latest,
)
from apt.trainops.checkpoints.manifest import write_manifest
from apt.trainops.checkpoints.payload import Payload
from apt.trainops.checkpoints.retention import CheckpointInfo, RetentionPolicy, select_kept
from apt.trainops.checkpoints.safetensors_file import write_safetensors

__all__ = ["SaveJob", "SaveStats", "Transaction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveStats:
    """Timings of one save. ``blocking_seconds`` is what the caller of ``save`` waited."""

    step: int
    blocking_seconds: float
    waited_for_previous_seconds: float
    total_seconds: float
    bytes_written: int


@dataclass
class SaveJob:
    """Everything one save writes, copied out of the live objects already."""

    step: int
    payload: Any
    parts: dict[str, dict[str, str]]
    rng: tuple[dict[str, Any], dict[str, torch.Tensor]]
    trainer_state: bytes
    metrics: dict[str, Any]
    cuda_event: Any
    started: float
    blocking: float = 0.0
    waited: float = 0.0


class Transaction:
    """Runs save jobs for one checkpoint folder (see the module docstring).

    Args:
        save_dir: the checkpoint folder.
        payload: writes the parts' state.
        policy: which committed checkpoints retention keeps.
        list_checkpoints: the committed checkpoints, oldest commit first.
        lock: held while committing, applying retention and recovering debris.
        is_writer, rank, world_size: who this process is.
        agree: ``agree(ok) -> every rank ok``; a synchronisation point of all ranks.
    """

    def __init__(
        self,
        save_dir: Path,
        *,
        payload: Payload,
        policy: RetentionPolicy,
        list_checkpoints: Callable[[], list[CheckpointInfo]],
        lock: threading.Lock,
        is_writer: bool,
        rank: int,
        world_size: int,
        agree: Callable[[bool], bool],
    ) -> None:
        self.save_dir = save_dir
        self.payload = payload
        self.policy = policy
        self.list_checkpoints = list_checkpoints
        self.lock = lock
        self.is_writer, self.rank, self.world_size = is_writer, rank, world_size
        self.agree = agree

    def run(self, job: SaveJob, *, in_background: bool) -> SaveStats:
        """stage -> write -> commit, with the same synchronisation points on every rank.

        Raises:
            CheckpointSaveError: the save failed on this rank or another; nothing was committed.
        """
        files = StageFiles(
            stage_dir(self.save_dir, job.step), job.step, in_background=in_background
        )
        error = self._attempt(lambda: self.stage(job.step) if self.is_writer else None)
        if not self.agree(error is None):  # the stage folder exists before anyone writes
            error = error or self._peer_failed(job.step, "creating the stage folder")
        if error is None:
            error = self._attempt(lambda: self.write(files, job))
        if not self.agree(error is None):  # every rank's files are on disk
            error = error or self._peer_failed(job.step, "writing its files")
        if error is None and self.is_writer:
            error = self._attempt(lambda: self.commit(files, metrics=job.metrics, parts=job.parts))
        if error is not None and self.is_writer:
            shutil.rmtree(files.root, ignore_errors=True)  # LATEST is untouched
        if not self.agree(error is None):  # committed (or abandoned) for every rank
            error = error or self._peer_failed(job.step, "committing")
        if error is not None:
            raise self._save_error(error, job.step)
        total = time.perf_counter() - job.started
        blocking = job.blocking if in_background else total
        size = sum(r.size for r in files.records.values())
        if self.is_writer:
            log.info(
                "checkpoint %s saved (%s in %.2f s; training blocked %.3f s)",
                step_dir(self.save_dir, job.step).name,
                human_bytes(size),
                total,
                blocking,
            )
        return SaveStats(job.step, blocking, job.waited, total, size)

    @staticmethod
    def _attempt(action: Callable[[], Any]) -> BaseException | None:
        try:
            action()
        except BaseException as exc:  # handed on: every rank must reach the next agreement
            return exc
        return None

    def _peer_failed(self, step: int, what: str) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} failed on another rank ({what}; that "
            "rank's log says why). Nothing was committed; LATEST still names the previous one.",
            step=step,
            path=stage_dir(self.save_dir, step),
        )

    def _save_error(self, error: BaseException, step: int) -> BaseException:
        if isinstance(error, CheckpointSaveError) or not isinstance(error, Exception):
            return error
        if isinstance(error, OSError):
            return save_error_from_os(error, step=step, save_dir=self.save_dir)
        new = CheckpointSaveError(
            f"saving the checkpoint of step {step} failed: {error}. The partial checkpoint was "
            "removed and LATEST still names the previous one.",
            step=step,
            path=stage_dir(self.save_dir, step),
        )
        new.__cause__ = error
        return new

    # ------------------------------------------------------------------ the three steps
    def stage(self, step: int) -> Path:
        """Writer: remove debris and create an empty stage folder for ``step``; return it."""
        with self.lock:
            clean_debris(self.save_dir)
            stage = stage_dir(self.save_dir, step)
            stage.mkdir(parents=True)
        return stage

    def write(self, files: StageFiles, job: SaveJob) -> None:
        """Every rank: write the payload, this rank's RNG, and (writer) the trainer state."""
        self.payload.write(files, job.payload, is_writer=self.is_writer)
        plain, tensors = job.rng
        rel = rng_file(self.rank)
        files.write_bytes(f"{rel}.json", dumps_json(plain))
        files.write(f"{rel}.safetensors", lambda fh: write_safetensors(fh.write, tensors, {}))
        if self.is_writer:
            files.write_bytes(TRAINER_STATE_FILE, job.trainer_state)

    def commit(
        self, files: StageFiles, *, metrics: dict[str, Any], parts: dict[str, dict[str, str]]
    ) -> Path:
        """Writer: manifest last, atomic rename into place, LATEST, retention; return the path.

        Raises:
            CheckpointSaveError: a rank's files are missing.
        """
        step = files.step
        missing = [
            r for r in range(self.world_size) if not (files.root / f"{rng_file(r)}.json").is_file()
        ]
        if missing:
            raise CheckpointSaveError(
                f"rank(s) {missing} wrote no RNG state for step {step}", step=step, path=files.root
            )
        with self.lock:
            sequence = 1 + max((i.sequence for i in self.list_checkpoints()), default=0)
            faults.maybe_kill("kill_before_manifest", step)
            write_manifest(
                files,
                step=step,
                sequence=sequence,
                metrics=metrics,
                world_size=self.world_size,
                parts=parts,
            )
            files.fsync_tree()
            faults.maybe_kill("kill_before_rename", step)
            target = step_dir(self.save_dir, step)
            aside = None
            if target.exists():  # re-saving a step (after a fallback): move the old one aside
                aside = replaced_dir(self.save_dir, step)
                if aside.exists():
                    shutil.rmtree(aside)
                target.rename(aside)
                fsync_dir(self.save_dir)
                faults.maybe_kill("kill_mid_replace", step)
            files.root.rename(target)
            fsync_dir(self.save_dir)
            faults.maybe_kill("kill_before_latest", step)
            write_latest(self.save_dir, target.name)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            self._apply_retention()
        return target

    def _apply_retention(self) -> None:
        infos = self.list_checkpoints()
        kept = select_kept(infos, self.policy)
        for info in infos:
            if info.path in kept:
                continue
            try:
                remove_dir(info.path)
                log.info("retention: deleted %s", info.name)
            except OSError as exc:
                log.warning("retention: could not delete %s: %s", info.path, exc)
