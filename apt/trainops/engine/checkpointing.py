"""The Trainer's side of checkpoints: what a run saves, how it resumes, and config drift.

A checkpoint holds, besides model/optimizer/scheduler/scaler and every rank's RNG (written by
:class:`~apt.trainops.checkpoints.CheckpointManager`), a ``trainer_state`` JSON document::

    {"train": TrainState, "callbacks": {...}, "config": {...resolved config...},
     "fingerprint": "...", "world_size": 2, "versions": {"apt": ..., "torch": ...}}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apt.core.config import APTConfig, config_from_dict
from apt.core.config.resume import is_resume_critical
from apt.core.errors import CheckpointError, ConfigError
from apt.core.redact import redact_mapping
from apt.core.version import __version__
from apt.trainops.checkpoints import CheckpointManager, CheckpointSaveError, LoadedCheckpoint
from apt.trainops.engine.bundle import TrainingBundle
from apt.trainops.engine.callbacks.base import CallbackManager
from apt.trainops.engine.state import TrainState

__all__ = ["RunCheckpoints", "RunRecord", "config_drift"]

log = logging.getLogger("apt")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(critical, benign) changes between a checkpoint's config and the current one, as
    ``key: old -> new`` lines; the schema says which keys are critical
    (:mod:`apt.core.config.resume`)."""
    old, new = _flatten(saved), _flatten(current)
    critical: list[str] = []
    benign: list[str] = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        (critical if is_resume_critical(APTConfig, key) else benign).append(line)
    return critical, benign


@dataclass(frozen=True)
class RunRecord:
    """What every checkpoint of a run records about the run, and a resume checks.

    Attributes:
        config: the resolved config (``APTConfig.to_dict()``), secrets masked
            (:func:`~apt.core.redact.redact_mapping`): checkpoints are files like any other.
        fingerprint: its sha256.
        world_size: processes in the run.
    """

    config: dict[str, Any]
    fingerprint: str
    world_size: int

    @classmethod
    def of(cls, config: APTConfig, world_size: int) -> RunRecord:
        """The record of ``config`` run on ``world_size`` processes."""
        return cls(redact_mapping(config.to_dict()), config.fingerprint(), world_size)

    @property
    def batch_size(self) -> int:
        """``training.batch_size`` (micro-batch sequences per rank)."""
        return int(self.config["training"]["batch_size"])


def _as_current_schema(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config as the current schema writes it (``task: causal_lm`` became
    ``task: {kind: causal_lm}``); as saved when it no longer validates."""
    try:
        return config_from_dict(saved, source="the checkpoint's config").to_dict()
    except ConfigError:
        return saved


_COUNTERS = ("epoch", "global_step", "batch_in_epoch", "micro_batch", "tokens_seen")
_FLAGS = ("finished", "pending_eval")


def check_trainer_state(saved: Any, path: Path) -> None:
    """Refuse a ``trainer_state`` whose hashes verify but whose content the resume cannot use
    (a list, a string step, a missing counter): the checkpoint is corrupt, and loading falls
    back to the previous one.

    Raises:
        CheckpointError: naming the file and the field.
    """
    where = f"{path / 'trainer_state.json'}"

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {field} {problem}; the checkpoint is corrupt")

    if not isinstance(saved, dict):
        raise bad("the document", f"is a {type(saved).__name__}, not an object")
    train = saved.get("train")
    if not isinstance(train, dict):
        raise bad("'train'", "is missing or not an object")
    unknown = sorted(set(train) - set(TrainState.__dataclass_fields__))
    if unknown:
        raise bad("'train'", f"holds unknown fields {unknown}")
    for name in _COUNTERS:
        value = train.get(name)
        if type(value) is not int or value < 0:
            raise bad(f"train.{name}", f"is {value!r}, not a whole number >= 0")
    for name in ("skipped_steps", "nonfinite_streak"):  # added in 2.0.0a1: optional
        value = train.get(name, 0)
        if type(value) is not int or value < 0:
            raise bad(f"train.{name}", f"is {value!r}, not a whole number >= 0")
    for name in _FLAGS:
        if type(train.get(name, False)) is not bool:
            raise bad(f"train.{name}", f"is {train.get(name)!r}, not true or false")
    for name in ("last_loss", "lr", "grad_norm"):
        if train.get(name) is not None and type(train[name]) not in (int, float):
            raise bad(f"train.{name}", f"is {train[name]!r}, not a number")
    metrics = train.get("metrics", {})
    if not isinstance(metrics, dict) or any(
        not isinstance(k, str) or (v is not None and type(v) not in (int, float))
        for k, v in metrics.items()
    ):
        raise bad("train.metrics", "is not an object of numbers")
    if not isinstance(train.get("stop_reason", ""), str):
        raise bad("train.stop_reason", "is not text")
    if not isinstance(saved.get("callbacks", {}), dict):
        raise bad("'callbacks'", "is not an object")
    if not isinstance(saved.get("config", {}), dict):
        raise bad("'config'", "is not an object")
    world = saved.get("world_size", 1)
    if type(world) is not int or world < 1:
        raise bad("world_size", f"is {world!r}, not a whole number >= 1")


def _warn_on_other_threads(saved: Any) -> None:
    """CPU kernels split their reductions by thread: another count changes the last bits."""
    now = torch.get_num_threads()
    if isinstance(saved, int) and saved != now:
        log.warning(
            "resuming with %d CPU threads; the checkpoint was written with %d. On the CPU the "
            "weights will not be bit-identical to an uninterrupted run (the losses agree to "
            "rounding); set training.cpu_threads=%d to continue exactly.",
            now,
            saved,
            saved,
        )


class RunCheckpoints:
    """Saves and resumes one run through its :class:`CheckpointManager`, which owns the
    ``training.checkpoints`` policy (when to save, async, on_save_error, retention).

    Args:
        manager: the checkpoint manager of the run.
        bundle: what the run trains; saved and loaded as a whole.
        callbacks: whose states are saved and restored.
        record: the run's config and world size (saved; compared on resume).
        allow_config_change: resume despite resume-critical config changes.
        export_final: writes what a finished run promises besides its checkpoint (the final
            model); called before the final checkpoint commits, since a rerun of a run whose
            final checkpoint exists only says "run already complete".
    """

    def __init__(
        self,
        manager: CheckpointManager,
        *,
        bundle: TrainingBundle,
        callbacks: CallbackManager,
        record: RunRecord,
        allow_config_change: bool = False,
        export_final: Callable[[], None] | None = None,
    ) -> None:
        self.manager = manager
        self.bundle = bundle
        self.callbacks = callbacks
        self.record = record
        self.allow_config_change = allow_config_change
        self.export_final = export_final

    # ------------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        """Whether the checkpoint policy saves at the end of ``step``."""
        return self.manager.should_save(step)

    def save(self, state: TrainState, reason: str, *, on_saved: Callable[[], None]) -> None:
        """Write a checkpoint of the current step (``reason``: interval, exit or final); the
        run ends after an exit or final save, so those wait for their commit."""
        if reason == "final" and self.export_final is not None:
            self.export_final()
        trainer_state = {
            "train": state.to_dict(),
            "callbacks": self.callbacks.state_dict(),
            "config": self.record.config,
            "fingerprint": self.record.fingerprint,
            "world_size": self.record.world_size,
            "cpu_threads": torch.get_num_threads(),
            "versions": {"apt": __version__, "torch": torch.__version__},
        }

        def committed() -> None:
            stats = self.manager.last_save
            if stats is not None:
                state.last_save = {
                    "step": stats.step,
                    "total_seconds": stats.total_seconds,
                    "blocking_seconds": stats.blocking_seconds,
                    "bytes": stats.bytes_written,
                }
            on_saved()

        with self._stop_on_failure():
            self.manager.save(
                state.global_step,
                self.bundle,
                trainer_state=trainer_state,
                metrics=dict(state.metrics),
                on_committed=committed,
            )
            if reason != "interval":
                self.manager.wait()

    def poll(self) -> None:
        """Report an async save that finished since (its checkpoint_save, or its error)."""
        with self._stop_on_failure():
            self.manager.poll()

    def finish(self) -> None:
        """Wait for the save in flight and report it."""
        with self._stop_on_failure():
            self.manager.wait()

    @contextmanager
    def _stop_on_failure(self) -> Iterator[None]:
        try:
            yield
        except CheckpointSaveError as exc:  # raised only under on_save_error: stop
            raise CheckpointError(
                f"{exc}\nThe run stops (training.checkpoints.on_save_error: stop); the "
                "previous checkpoint is intact and the same command resumes from it."
            ) from None

    # ------------------------------------------------------------------ resuming
    def resume(self, state: TrainState) -> LoadedCheckpoint | None:
        """Load the newest good checkpoint into the bundle and ``state``; None when none."""
        loaded = self.manager.load_latest(
            self.bundle,
            restore_rng=True,
            # Before the weights: a changed model shape is config drift (exit 2, a diff), not
            # a state_dict size mismatch.
            before_load=self._check_drift,
        )
        if loaded is None:
            return None
        saved = loaded.trainer_state
        restored = TrainState.from_dict(saved["train"])
        self._carry_data_cursor(restored, saved)
        for name in vars(restored):
            setattr(state, name, getattr(restored, name))
        self.callbacks.load_state_dict(saved.get("callbacks", {}))
        log.info("resumed from %s (epoch %d, step %d)", loaded.path, state.epoch, state.global_step)
        _warn_on_other_threads(saved.get("cpu_threads"))
        return loaded

    def _carry_data_cursor(self, restored: TrainState, saved: dict[str, Any]) -> None:
        """Re-express the epoch cursor for a new world size or batch size.

        The cursor counts micro-batches per rank; what is invariant is the number of sequences
        all ranks have read, which must split evenly into the new micro-batches.
        """
        world = self.record.world_size
        old_world = int(saved.get("world_size", world))
        old_batch = int(saved.get("config", {}).get("training", {}).get("batch_size", 0))
        new_batch = self.record.batch_size
        if not old_batch or (old_world, old_batch) == (world, new_batch):
            return
        consumed = restored.batch_in_epoch * old_batch * old_world
        per_micro = new_batch * world
        if consumed % per_micro:
            raise ConfigError(
                f"the checkpoint is {consumed} sequences into epoch {restored.epoch}, which is "
                f"not a whole number of micro-batches of {new_batch} x {world} processes; pick "
                "training.batch_size so that batch_size x world size divides "
                f"{consumed}, or resume at an epoch boundary"
            )
        restored.batch_in_epoch = consumed // per_micro

    def _check_drift(self, saved: dict[str, Any], path: Path) -> None:
        check_trainer_state(saved, path)
        critical, benign = config_drift(
            _as_current_schema(saved.get("config", {})), self.record.config
        )
        world = self.record.world_size
        if saved.get("world_size", world) != world:
            critical.append(f"world size: {saved['world_size']} -> {world}")
        for line in benign:
            log.info("config changed since %s (allowed): %s", path.name, line)
        if critical and not self.allow_config_change:
            raise ConfigError(
                f"the run folder's checkpoint {path} was made with a different config; "
                "resuming would not continue the same run:\n  "
                + "\n  ".join(critical)
                + "\nUse a new artifacts.experiment_name for a new run, or pass "
                "--allow-config-change (Trainer(allow_config_change=True)) to resume anyway."
            )
        for line in critical:
            log.warning("resuming despite a resume-critical change: %s", line)
