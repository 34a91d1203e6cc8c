"""The Trainer's side of checkpoints: what a run saves, how it resumes, and config drift.

A checkpoint holds, besides model/optimizer/scheduler/scaler and every rank's RNG (written by
:class:`~apt.trainops.checkpoints.CheckpointManager`), a ``trainer_state`` JSON document::

    {"train": TrainState, "callbacks": {...}, "config": {...resolved config...},
     "fingerprint": "...", "world_size": 2, "versions": {"apt": ..., "torch": ...}}
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from apt.core.config import APTConfig
from apt.core.errors import CheckpointError, ConfigError
from apt.core.version import __version__
from apt.trainops.checkpoints import CheckpointManager, CheckpointSaveError, LoadedCheckpoint
from apt.trainops.engine.callbacks.base import CallbackManager
from apt.trainops.engine.state import TrainState

__all__ = ["RunCheckpoints", "config_drift"]

log = logging.getLogger("apt")

#: Dotted prefixes whose change makes a resume meaningless (another model, data or batch).
RESUME_CRITICAL = (
    "model.",
    "data.source",
    "data.train_files",
    "data.val_files",
    "data.text_field",
    "data.val_fraction",
    "data.max_corpus_bytes",
    "data.tokenizer",
    "data.seq_len",
    "data.shuffle",
    "training.task",
    "training.batch_size",
    "training.gradient_accumulation_steps",
    "training.seed",
    "training.optimizer.kind",
    "schedules.",
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(critical, benign) changes between a checkpoint's config and the current one, as
    ``key: old -> new`` lines."""
    old, new = _flatten(saved), _flatten(current)
    critical: list[str] = []
    benign: list[str] = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        is_critical = any(key == p or key.startswith(p) for p in RESUME_CRITICAL)
        (critical if is_critical else benign).append(line)
    return critical, benign


class RunCheckpoints:
    """Saves and resumes one run through a :class:`CheckpointManager`.

    Args:
        config: the run's config (its ``training.checkpoints`` section configures the manager;
            the whole config is recorded for drift checks).
        manager: the checkpoint manager of the run folder.
        callbacks: whose states are saved and restored.
        world_size: processes in this run.
        allow_config_change: resume despite resume-critical config changes.
    """

    def __init__(
        self,
        config: APTConfig,
        *,
        manager: CheckpointManager,
        callbacks: CallbackManager,
        world_size: int,
        allow_config_change: bool = False,
    ) -> None:
        self.config = config
        self.manager = manager
        self.callbacks = callbacks
        self.world_size = world_size
        self.allow_config_change = allow_config_change
        self._announce: Callable[[], None] | None = None  # on_saved of the async save in flight

    def save(
        self,
        state: TrainState,
        *,
        model: Any,
        optimizer: Any,
        lr_scheduler: Any,
        scaler: Any,
        on_saved: Callable[[], None],
    ) -> Path | None:
        """Write a checkpoint of the current step; apply ``on_save_error`` to a failure."""
        trainer_state = {
            "train": state.to_dict(),
            "callbacks": self.callbacks.state_dict(),
            "config": self.config.to_dict(),
            "fingerprint": self.config.fingerprint(),
            "world_size": self.world_size,
            "versions": {"apt": __version__, "torch": torch.__version__},
        }
        self.finish()  # a failed async save is reported with its own step; this one still runs
        try:
            path = self.manager.save(
                state.global_step,
                model=model,
                optimizer=optimizer,
                scheduler=lr_scheduler,
                scaler=scaler,
                trainer_state=trainer_state,
                metrics=dict(state.metrics),
            )
        except CheckpointSaveError as exc:
            self._on_save_error(exc)
            return None
        if self.manager.cfg.async_save:
            self._announce = on_saved  # once the background commit is done
        else:
            on_saved()
        return path

    def poll(self) -> None:
        """If the async save in flight has finished, report it (``on_saved``, or its error).

        Never blocks; the loop calls it after every step.
        """
        if self._announce is not None and not self.manager.busy:
            self.finish()

    def finish(self) -> None:
        """Wait for the save in flight (async); call its ``on_saved`` once committed, or apply
        ``on_save_error`` to its failure."""
        announce, self._announce = self._announce, None
        try:
            self.manager.wait()
        except CheckpointSaveError as exc:
            self._on_save_error(exc)
            return
        if announce is not None:
            announce()

    def _on_save_error(self, exc: CheckpointSaveError) -> None:
        if self.config.training.checkpoints.on_save_error == "stop":
            raise CheckpointError(
                f"{exc}\nThe run stops (training.checkpoints.on_save_error: stop); the "
                "previous checkpoint is intact and the same command resumes from it."
            ) from None
        log.warning("checkpoint of step %d failed, training goes on: %s", exc.step, exc)

    def resume(
        self, state: TrainState, *, model: Any, optimizer: Any, lr_scheduler: Any, scaler: Any
    ) -> LoadedCheckpoint | None:
        """Load the newest good checkpoint into the objects and ``state``; None when none."""
        loaded = self.manager.load_latest(
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            scaler=scaler,
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
        for field in vars(restored):
            setattr(state, field, getattr(restored, field))
        self.callbacks.load_state_dict(saved.get("callbacks", {}))
        log.info("resumed from %s (epoch %d, step %d)", loaded.path, state.epoch, state.global_step)
        return loaded

    def _carry_data_cursor(self, restored: TrainState, saved: dict[str, Any]) -> None:
        """Re-express the epoch cursor for a new world size or batch size.

        The cursor counts micro-batches per rank; what is invariant is the number of sequences
        all ranks have read, which must split evenly into the new micro-batches.
        """
        old_world = int(saved.get("world_size", self.world_size))
        old_batch = int(saved.get("config", {}).get("training", {}).get("batch_size", 0))
        new_batch = self.config.training.batch_size
        if not old_batch or (old_world, old_batch) == (self.world_size, new_batch):
            return
        consumed = restored.batch_in_epoch * old_batch * old_world
        per_micro = new_batch * self.world_size
        if consumed % per_micro:
            raise ConfigError(
                f"the checkpoint is {consumed} sequences into epoch {restored.epoch}, which is "
                f"not a whole number of micro-batches of {new_batch} x {self.world_size} "
                "processes; pick training.batch_size so that batch_size x world size divides "
                f"{consumed}, or resume at an epoch boundary"
            )
        restored.batch_in_epoch = consumed // per_micro

    def _check_drift(self, saved: dict[str, Any], path: Path) -> None:
        current = self.config.to_dict()
        critical, benign = config_drift(saved.get("config", {}), current)
        if saved.get("world_size", self.world_size) != self.world_size:
            critical.append(f"world size: {saved['world_size']} -> {self.world_size}")
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
