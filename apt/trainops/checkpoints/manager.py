"""CheckpointManager: the one owner of ``training.checkpoints``: when, where and how to save.

It decides when a step is due (``save_interval``), writes saves as transactions (sync or in a
background thread, ``async_save``), applies the error policy (``on_save_error``), keeps what
retention says, and loads the newest checkpoint that verifies. A save::

    snapshot (caller's thread)   state -> CPU memory; the only part that blocks training
    transaction                  stage -> write -> commit (checkpoints/transaction.py)

See ``docs/checkpoints.md`` for the format, the commit protocol and the guarantees.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from apt.core.config import CheckpointConfig
from apt.core.errors import CheckpointError, ConfigError
from apt.core.registry import closest_names
from apt.trainops.checkpoints.errors import CheckpointSaveError
from apt.trainops.checkpoints.fsio import dumps_json
from apt.trainops.checkpoints.layout import clean_debris, committed_dirs, step_dir
from apt.trainops.checkpoints.loading import (
    LoadedCheckpoint,
    newest_good_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)
from apt.trainops.checkpoints.manifest import read_manifest
from apt.trainops.checkpoints.parts import describe_parts
from apt.trainops.checkpoints.payload import FullStatePayload, Payload
from apt.trainops.checkpoints.retention import CheckpointInfo, RetentionPolicy
from apt.trainops.checkpoints.rng import capture_rng_state, split_rng_state
from apt.trainops.checkpoints.tensorio import SnapshotBuffers
from apt.trainops.checkpoints.transaction import SaveJob, SaveStats, Transaction
from apt.trainops.checkpoints.verify import verify_checkpoint

__all__ = ["CheckpointManager", "LoadedCheckpoint", "SaveStats"]

log = logging.getLogger(__name__)

#: The folder checkpoints go to when neither ``save_dir`` nor ``directory`` says.
DEFAULT_DIR = "checkpoints"


def _config(cfg: CheckpointConfig | None, overrides: dict[str, Any]) -> CheckpointConfig:
    unknown = sorted(set(overrides) - set(CheckpointConfig.model_fields))
    if unknown:
        hints = {k: closest_names(k, list(CheckpointConfig.model_fields)) for k in unknown}
        lines = [
            f"{k}: unknown option" + (f". Did you mean {hints[k][0]!r}?" if hints[k] else "")
            for k in unknown
        ]
        valid = ", ".join(CheckpointConfig.model_fields)
        raise ConfigError(f"CheckpointManager(): {'; '.join(lines)}. Valid options: {valid}")
    base = cfg.model_dump() if cfg is not None else {}
    try:
        return CheckpointConfig.model_validate({**base, **overrides})
    except ValidationError as exc:
        lines = [
            f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise ConfigError("CheckpointManager(): " + "; ".join(lines)) from None


class CheckpointManager:
    """Saves, verifies, loads and prunes the checkpoints of one folder.

    Args:
        cfg: the ``training.checkpoints`` section (defaults when None).
        save_dir: where checkpoints live (default: ``cfg.directory``, else ``checkpoints``;
            relative paths are relative to the working directory).
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
        payload: the state format (default :class:`FullStatePayload`; see
            :class:`~apt.trainops.checkpoints.payload.Payload`).
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
        self.save_dir = Path(save_dir or self.cfg.directory or DEFAULT_DIR)
        self.is_writer, self.rank, self.world_size = is_writer, rank, world_size
        self._barrier_fn = barrier
        self._lock = threading.Lock()  # commit, retention and recovery never overlap
        self._transaction = Transaction(
            self.save_dir,
            payload=payload or FullStatePayload(),
            policy=RetentionPolicy(
                keep_last_n=self.cfg.keep_last_n,
                keep_best_n=self.cfg.keep_best_n,
                best_metric=self.cfg.best_metric,
                best_mode=self.cfg.best_mode,
                milestone_interval=self.cfg.milestone_interval,
            ),
            list_checkpoints=self.list_checkpoints,
            lock=self._lock,
            is_writer=is_writer,
            rank=rank,
            world_size=world_size,
            agree=agree or self._barrier_only,
        )
        self._buffers = SnapshotBuffers()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._on_committed: Callable[[], None] | None = None  # of the async save in flight
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
            if path.is_symlink():  # never loaded, so never ranked or deleted through the link
                log.debug("skipping %s: a symbolic link", path)
                continue
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
        parts: Mapping[str, Any] | None = None,
        *,
        trainer_state: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        on_committed: Callable[[], None] | None = None,
        **named_parts: Any,
    ) -> Path | None:
        """Save a checkpoint of ``step``; with ``async_save`` return once the state is copied.

        Args:
            step: the optimizer step (names the folder ``step-%09d``).
            parts: the named stateful parts to save (a mapping such as
                :class:`~apt.trainops.engine.TrainingBundle`): ``nn.Module`` (plain,
                ``torch.compile``'d or DDP-wrapped; names are stored clean), optimizers, and
                anything with ``state_dict()``/``load_state_dict()``. None values are skipped.
            trainer_state: JSON-compatible loop state (epoch, data cursor, callbacks, ...).
            metrics: JSON numbers; ``best_metric`` among them ranks checkpoints for retention.
            on_committed: called in this thread once the checkpoint is committed: before
                ``save`` returns, or (async) by the :meth:`poll` or :meth:`wait` that sees the
                background commit done.
            **named_parts: more parts by keyword (``model=model, optimizer=optimizer``).

        Returns:
            The checkpoint's folder (committed already unless ``async_save``); None when the
            save failed and ``on_save_error`` is ``continue``.

        Raises:
            CheckpointSaveError: with ``on_save_error: stop``, this save failed (sync), or the
                previous async save failed (this one then did not start). Nothing partial is
                advertised either way.
            CheckpointError: a state that cannot be stored without pickle, or a part that is
                not stateful.
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
        described = describe_parts({**(parts or {}), **named_parts})
        snap = self._transaction.payload.snapshot(
            described, buffers=self._buffers if use_async else None, is_writer=self.is_writer
        )
        event = None
        if use_async and self._buffers.used_cuda:
            event = torch.cuda.Event()
            event.record()
        job = SaveJob(
            step=step,
            payload=snap,
            parts={p.name: p.record() for p in described},
            rng=split_rng_state(capture_rng_state()),
            trainer_state=state_bytes,
            metrics=metrics,
            cuda_event=event,
            started=started,
            waited=waited,
        )
        if use_async:
            job.blocking = time.perf_counter() - started
            self.last_save_blocking_seconds = job.blocking
            self._on_committed = on_committed
            self._thread = threading.Thread(
                target=self._background, args=(job,), name="apt-checkpoint-writer"
            )
            self._thread.start()
            return step_dir(self.save_dir, step)
        try:
            self.last_save = self._transaction.run(job, in_background=False)
        except CheckpointSaveError as exc:
            self._failed(exc)
            return None
        self.last_save_blocking_seconds = time.perf_counter() - started
        if on_committed is not None:
            on_committed()
        return step_dir(self.save_dir, step)

    def _background(self, job: SaveJob) -> None:
        try:
            if job.cuda_event is not None:
                job.cuda_event.synchronize()
            self.last_save = self._transaction.run(job, in_background=True)
        except BaseException as exc:  # kept for the next save()/poll()/wait(), never swallowed
            log.error("async checkpoint save of step %d failed: %s", job.step, exc)
            self._error = exc

    @property
    def busy(self) -> bool:
        """An async save is still being written (``wait`` would block)."""
        return self._thread is not None and self._thread.is_alive()

    def poll(self) -> None:
        """If the async save in flight has finished, report it (its ``on_committed``, or its
        error by ``on_save_error``); never blocks. A training loop calls it after every step."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed, then report it as
        :meth:`poll` does (an error is reported once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        announce, self._on_committed = self._on_committed, None
        if self._error is not None:
            error, self._error = self._error, None
            if not isinstance(error, CheckpointSaveError):
                raise error
            self._failed(error)
        elif announce is not None:
            announce()

    def _failed(self, exc: CheckpointSaveError) -> None:
        """Apply ``on_save_error`` to a failed save."""
        if self.cfg.on_save_error == "stop":
            raise exc
        log.warning("checkpoint of step %d failed, training goes on: %s", exc.step, exc)

    def close(self) -> None:
        """Finish the save in flight (reporting it as :meth:`wait` does)."""
        self.wait()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _barrier(self) -> None:
        if self._barrier_fn is not None:
            self._barrier_fn()

    def _barrier_only(self, ok: bool) -> bool:
        """Without ``agree``: a plain barrier, and this rank knows only its own outcome."""
        self._barrier()
        return ok

    # ------------------------------------------------------------------ load
    def load(
        self,
        name_or_step: int | str | Path,
        parts: Mapping[str, Any] | None = None,
        *,
        map_location: str = "cpu",
        restore_rng: bool = False,
        **named_parts: Any,
    ) -> LoadedCheckpoint:
        """Verify the named checkpoint and load it into the given parts.

        Args:
            name_or_step: ``1000``, ``'checkpoint-1000'``, ``'step-000001000'``, or a folder.
            parts, **named_parts: the parts to load into, as for :meth:`save`; parts the
                checkpoint holds but that are not given are not loaded.
            map_location: device tensors are read to.
            restore_rng: also put every RNG back (what a resume wants).

        Raises:
            CheckpointError: no such checkpoint, a file that fails verification (named, with
                expected vs actual size or sha256, or why it is refused: a symbolic link, not a
                regular file, a path out of the folder), malformed content (the file and the
                field), a part it does not hold, or state that does not fit the objects
                (:class:`~apt.trainops.checkpoints.errors.CheckpointMismatchError`).
        """
        described = describe_parts(
            {**(parts or {}), **named_parts}, partial=self._transaction.payload.holds_part
        )
        self._finish_quietly()  # retention of a save in flight must not race this read
        ckpt = verify_checkpoint(resolve_checkpoint(self.save_dir, name_or_step))
        return read_checkpoint(
            ckpt,
            self._transaction.payload,
            described,
            rank=self.rank,
            map_location=map_location,
            restore_rng=restore_rng,
        )

    def load_latest(
        self,
        parts: Mapping[str, Any] | None = None,
        *,
        map_location: str = "cpu",
        restore_rng: bool = False,
        before_load: Callable[[dict[str, Any], Path], None] | None = None,
        **named_parts: Any,
    ) -> LoadedCheckpoint | None:
        """Load the newest checkpoint that verifies into the given parts; None when there is
        none.

        A corrupt, partial, refused or malformed newer checkpoint is skipped with a warning
        naming what was wrong and (writer) moved aside as ``.corrupt-step-N``; so is one that
        does not fit the objects when an older one does. Collective when a barrier is given.
        ``before_load(trainer_state, path)`` runs once the checkpoint is verified and before
        anything is loaded into the objects (the Trainer's config-drift check); a
        ``CheckpointError`` it raises rejects that checkpoint as corrupt, anything else
        propagates.

        Raises:
            CheckpointMismatchError: checkpoints verify but none fits the objects (nothing is
                moved).
        """
        described = describe_parts(
            {**(parts or {}), **named_parts}, partial=self._transaction.payload.holds_part
        )
        self._finish_quietly()  # its barriers must not interleave with this one's
        if self.is_writer:
            with self._lock:
                clean_debris(self.save_dir)  # also puts back a folder a crashed re-save moved
        self._barrier()
        ckpt = newest_good_checkpoint(
            self.save_dir, described, quarantine_bad=self.is_writer, before_load=before_load
        )
        if ckpt is None:
            return None
        return read_checkpoint(
            ckpt,
            self._transaction.payload,
            described,
            rank=self.rank,
            map_location=map_location,
            restore_rng=restore_rng,
        )

    def _finish_quietly(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
