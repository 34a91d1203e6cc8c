"""CheckpointManager: transactional saves, verified loads, retention, async writes.

A save is a transaction (see ``docs/checkpoints.md``)::

    snapshot (caller's thread)   state -> CPU memory; the only part that blocks training
    stage                        writer: clean debris, mkdir <save_dir>/.tmp-step-N   | barrier
    write_payload                every rank writes its files (hashed, fsynced)         | barrier
    commit                       writer: MANIFEST.json, rename to step-N, fsync,
                                 LATEST, retention                                     | barrier

A checkpoint exists only once its folder has a MANIFEST.json, and the manifest is written after
every other file, so a crash at any point leaves either the previous state or the new one.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from apt.core.config import CheckpointConfig
from apt.core.errors import CheckpointError, ConfigError
from apt.trainops.checkpoints import faults
from apt.trainops.checkpoints.errors import CheckpointSaveError, human_bytes, save_error_from_os
from apt.trainops.checkpoints.fsio import StageFiles, dumps_json, fsync_dir
from apt.trainops.checkpoints.layout import (
    TRAINER_STATE_FILE,
    clean_debris,
    committed_dirs,
    remove_dir,
    replaced_dir,
    rng_file,
    stage_dir,
    step_dir,
    write_latest,
)
from apt.trainops.checkpoints.loading import (
    LoadedCheckpoint,
    newest_good_checkpoint,
    read_checkpoint,
    read_trainer_state,
    resolve_checkpoint,
)
from apt.trainops.checkpoints.manifest import read_manifest, verify_checkpoint, write_manifest
from apt.trainops.checkpoints.payload import FullStatePayload, Payload
from apt.trainops.checkpoints.retention import CheckpointInfo, RetentionPolicy, select_kept
from apt.trainops.checkpoints.rng import capture_rng_state, split_rng_state
from apt.trainops.checkpoints.tensorio import SnapshotBuffers, write_safetensors

__all__ = ["CheckpointManager", "LoadedCheckpoint", "SaveStats"]

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
class _Objects:
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None


@dataclass
class _SaveJob:
    step: int
    payload: Any
    rng: tuple[dict[str, Any], dict[str, torch.Tensor]]
    trainer_state: bytes
    metrics: dict[str, Any]
    cuda_event: Any
    started: float
    blocking: float
    waited: float


def _config(cfg: CheckpointConfig | None, overrides: dict[str, Any]) -> CheckpointConfig:
    base = cfg.model_dump() if cfg is not None else {}
    try:
        return CheckpointConfig.model_validate({**base, **overrides})
    except ValidationError as exc:
        raise ConfigError(f"CheckpointManager: invalid argument(s):\n{exc}") from None


class CheckpointManager:
    """Saves, verifies, loads and prunes the checkpoints of one run folder.

    Args:
        cfg: the ``training.checkpoints`` section (defaults when None).
        save_dir: where checkpoints live (default: ``cfg.directory``, relative to the cwd).
        is_writer: this process writes the shared files and commits (rank 0).
        barrier: blocks until every rank reaches it; None in a single process. With
            ``async_save`` it is called from the writer thread, so back it by a process group
            of its own (``dist.new_group(backend="gloo")``), not the one training uses.
        agree: ``agree(ok) -> all ranks ok``, a barrier that also tells every rank whether all
            of them succeeded (:class:`~apt.trainops.distributed.SideChannel` has one). Given,
            the writer commits only when every rank wrote its files, and every rank raises
            when the save failed anywhere, so all ranks apply the same error policy. Without
            it (threads in tests) a rank knows only its own failure.
        rank: this process's rank (names its RNG file).
        world_size: number of processes; the writer checks every rank's RNG file is present.
        payload: the state format (default :class:`FullStatePayload`; a sharded payload plugs in
            here, see :class:`~apt.trainops.checkpoints.payload.Payload`).
        **overrides: any ``CheckpointConfig`` field (``save_interval=500, keep_last_n=5``),
            validated like the YAML.

    Attributes:
        last_save: :class:`SaveStats` of the latest finished save (None before one).
        last_save_blocking_seconds: how long the latest ``save`` call blocked its caller.
    """

    def __init__(
        self,
        cfg: CheckpointConfig | None = None,
        *,
        save_dir: str | Path | None = None,
        is_writer: bool = True,
        barrier: Callable[[], None] | None = None,
        agree: Callable[[bool], bool] | None = None,
        rank: int = 0,
        world_size: int = 1,
        payload: Payload | None = None,
        **overrides: Any,
    ) -> None:
        self.cfg = _config(cfg, overrides)
        self.save_dir = Path(save_dir if save_dir is not None else self.cfg.directory)
        self.is_writer, self.rank, self.world_size = is_writer, rank, world_size
        self.policy = RetentionPolicy(
            keep_last_n=self.cfg.keep_last_n,
            keep_best_n=self.cfg.keep_best_n,
            best_metric=self.cfg.best_metric,
            best_mode=self.cfg.best_mode,
            milestone_interval=self.cfg.milestone_interval,
        )
        self._barrier_fn = barrier
        self._agree_fn = agree
        self._payload: Payload = payload or FullStatePayload()
        self._buffers = SnapshotBuffers()
        self._lock = threading.Lock()  # commit, retention and recovery never overlap
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_save: SaveStats | None = None
        self.last_save_blocking_seconds: float | None = None
        if is_writer:
            self.save_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ queries
    def should_save(self, step: int) -> bool:
        """True when ``step`` is a positive multiple of ``save_interval``."""
        interval = self.cfg.save_interval
        return interval is not None and step > 0 and step % interval == 0

    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest commit first (manifests read, files not hashed)."""
        infos = []
        for step, path in committed_dirs(self.save_dir):
            try:
                m = read_manifest(path)
            except CheckpointError as exc:
                log.debug("skipping %s: %s", path, exc)
                continue
            infos.append(
                CheckpointInfo(
                    step=step, path=path, sequence=m.sequence, metrics=m.metrics, created=m.created
                )
            )
        return sorted(infos, key=lambda i: (i.sequence, i.step))

    def latest_step(self) -> int | None:
        """Step of the newest committed checkpoint (not verified), or None."""
        infos = self.list_checkpoints()
        return infos[-1].step if infos else None

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        trainer_state: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Path:
        """Save a checkpoint of ``step``; with ``async_save`` return once the state is copied.

        Args:
            step: the optimizer step (names the folder ``step-%09d``).
            model: the model (plain, ``torch.compile``'d or DDP-wrapped; names are stored clean).
            optimizer, scheduler, scaler: objects with ``state_dict()``, or None.
            trainer_state: JSON-compatible loop state (epoch, data cursor, callbacks, ...).
            metrics: JSON numbers; ``best_metric`` among them ranks checkpoints for retention.

        Returns:
            The checkpoint's folder (committed already unless ``async_save``).

        Raises:
            CheckpointSaveError: this save failed (sync), or the previous async save failed
                (this one then did not start). Nothing partial is advertised either way.
            CheckpointError: a state that cannot be stored without pickle.
        """
        if step < 0:
            raise CheckpointError(f"cannot save a negative step ({step})")
        started = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - started
        try:
            state_bytes = dumps_json(trainer_state or {})
            metrics = json.loads(json.dumps(metrics or {}))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"trainer_state/metrics of step {step} are not JSON: {exc}"
            ) from None
        use_async = self.cfg.async_save
        snap = self._payload.snapshot(
            _Objects(model, optimizer, scheduler, scaler),
            buffers=self._buffers if use_async else None,
            is_writer=self.is_writer,
        )
        event = None
        if use_async and self._buffers.used_cuda:
            event = torch.cuda.Event()
            event.record()
        job = _SaveJob(
            step,
            snap,
            split_rng_state(capture_rng_state()),
            state_bytes,
            metrics,
            event,
            started,
            0.0,
            waited,
        )
        if use_async:
            self._thread = threading.Thread(
                target=self._background, args=(job,), name="apt-checkpoint-writer"
            )
            job.blocking = time.perf_counter() - started
            self.last_save_blocking_seconds = job.blocking
            self._thread.start()
        else:
            self._persist(job, in_background=False)
            self.last_save_blocking_seconds = time.perf_counter() - started
        return step_dir(self.save_dir, step)

    @property
    def busy(self) -> bool:
        """An async save is still being written (``wait`` would block)."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish the save in flight (re-raising its error)."""
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _background(self, job: _SaveJob) -> None:
        try:
            if job.cuda_event is not None:
                job.cuda_event.synchronize()
            self._persist(job, in_background=True)
        except BaseException as exc:  # kept for the next save()/wait(), never swallowed
            log.error("async checkpoint save of step %d failed: %s", job.step, exc)
            self._error = exc

    def _barrier(self) -> None:
        if self._barrier_fn is not None:
            self._barrier_fn()

    def _agree(self, ok: bool) -> bool:
        """A barrier; True when every rank passed ``ok`` (only this rank's without ``agree``)."""
        if self._agree_fn is None:
            self._barrier()
            return ok
        return self._agree_fn(ok)

    def _persist(self, job: _SaveJob, *, in_background: bool) -> None:
        """stage -> write_payload -> commit, with the same barriers on every rank."""
        files = StageFiles(
            stage_dir(self.save_dir, job.step), job.step, in_background=in_background
        )
        error: BaseException | None = None
        try:
            if self.is_writer:
                self.begin(job.step)
        except BaseException as exc:
            error = exc
        if not self._agree(error is None):  # the stage folder exists before anyone writes
            error = error or self._peer_failed(job.step, "creating the stage folder")
        if error is None:
            try:
                self.write_payload(files, job)
            except BaseException as exc:
                error = exc
        if not self._agree(error is None):  # every rank's files are on disk
            error = error or self._peer_failed(job.step, "writing its files")
        if error is None and self.is_writer:
            try:
                self.commit(files, metrics=job.metrics)
            except BaseException as exc:
                error = exc
        if error is not None and self.is_writer:
            self.abort(files.root)
        if not self._agree(error is None):  # committed (or abandoned) for every rank
            error = error or self._peer_failed(job.step, "committing")
        if error is not None:
            raise self._save_error(error, job.step)
        total = time.perf_counter() - job.started
        blocking = job.blocking if in_background else total
        size = sum(r.size for r in files.records.values())
        self.last_save = SaveStats(job.step, blocking, job.waited, total, size)
        if self.is_writer:
            log.info(
                "checkpoint %s saved (%s in %.2f s; training blocked %.3f s)",
                step_dir(self.save_dir, job.step).name,
                human_bytes(size),
                total,
                blocking,
            )

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

    # ------------------------------------------------------------------ the transaction
    def begin(self, step: int) -> Path:
        """Writer: remove debris and create an empty stage folder for ``step``; return it."""
        with self._lock:
            clean_debris(self.save_dir)
            stage = stage_dir(self.save_dir, step)
            stage.mkdir(parents=True)
        return stage

    def write_payload(self, files: StageFiles, job: _SaveJob) -> None:
        """Every rank: write the payload, this rank's RNG, and (writer) the trainer state."""
        self._payload.write(files, job.payload, is_writer=self.is_writer)
        plain, tensors = job.rng
        rel = rng_file(self.rank)
        files.write_bytes(f"{rel}.json", dumps_json(plain))
        files.write(f"{rel}.safetensors", lambda fh: write_safetensors(fh.write, tensors, {}))
        if self.is_writer:
            files.write_bytes(TRAINER_STATE_FILE, job.trainer_state)

    def commit(self, files: StageFiles, *, metrics: dict[str, Any]) -> Path:
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
        with self._lock:
            sequence = 1 + max((i.sequence for i in self.list_checkpoints()), default=0)
            faults.maybe_kill("kill_before_manifest", step)
            write_manifest(
                files, step=step, sequence=sequence, metrics=metrics, world_size=self.world_size
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

    def abort(self, stage: Path) -> None:
        """Writer: remove a failed save's stage folder (LATEST is untouched)."""
        shutil.rmtree(stage, ignore_errors=True)

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

    # ------------------------------------------------------------------ load
    def load(
        self,
        name_or_step: int | str | Path,
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        map_location: str = "cpu",
        restore_rng: bool = False,
    ) -> LoadedCheckpoint:
        """Verify the named checkpoint and load it into the given objects.

        Args:
            name_or_step: ``1000``, ``'checkpoint-1000'``, ``'step-000001000'``, or a folder.
            model, optimizer, scheduler, scaler: objects to load into (None: skipped).
            map_location: device tensors are read to.
            restore_rng: also put every RNG back (what a resume wants).

        Raises:
            CheckpointError: no such checkpoint, a file that fails verification (named, with
                expected vs actual size or sha256), or state that does not fit the objects.
        """
        self._finish_quietly()  # retention of a save in flight must not race this read
        ckpt = verify_checkpoint(resolve_checkpoint(self.save_dir, name_or_step))
        return read_checkpoint(
            ckpt,
            self._payload,
            _Objects(model, optimizer, scheduler, scaler),
            rank=self.rank,
            map_location=map_location,
            restore_rng=restore_rng,
        )

    def load_latest(
        self,
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        map_location: str = "cpu",
        restore_rng: bool = False,
        before_load: Callable[[dict[str, Any], Path], None] | None = None,
    ) -> LoadedCheckpoint | None:
        """Load the newest checkpoint that verifies; None when there is none.

        A corrupt or partial newer checkpoint is skipped with a warning naming what was wrong
        and (writer) moved aside as ``.corrupt-step-N``. Collective when a barrier is given.
        ``before_load(trainer_state, path)`` runs once the checkpoint is verified and before
        anything is loaded into the objects (the Trainer's config-drift check; it may raise).
        """
        self._finish_quietly()  # its barriers must not interleave with this one's
        if self.is_writer:
            with self._lock:
                clean_debris(self.save_dir)  # also puts back a folder a crashed re-save moved
        self._barrier()
        ckpt = newest_good_checkpoint(self.save_dir, quarantine_bad=self.is_writer)
        if ckpt is None:
            return None
        if before_load is not None:
            before_load(read_trainer_state(ckpt), ckpt.path)
        return read_checkpoint(
            ckpt,
            self._payload,
            _Objects(model, optimizer, scheduler, scaler),
            rank=self.rank,
            map_location=map_location,
            restore_rng=restore_rng,
        )

    def _finish_quietly(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
