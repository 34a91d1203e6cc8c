"""The builders a Trainer composes: each makes one part of a run from the config section it needs.

``Trainer.from_config(cfg)`` calls, in order: :func:`build_task` (``cfg.training.task``) ->
the task's ``build_model`` (``cfg.model``) -> the strategy (``cfg.training.distributed``) ->
:func:`build_loaders` (``cfg.data``) -> :func:`plan_loop` (``cfg.training``, ``cfg.eval``) ->
the task's ``build_optimizer`` / ``build_scheduler`` (``cfg.training.optimizer`` /
``.scheduler``) -> :func:`build_callbacks` (``cfg.monitoring``, ``cfg.callbacks``,
``cfg.schedules``) -> :func:`build_checkpoints` (``cfg.training.checkpoints``). A recipe replaces
one of them (most often through its task) and keeps the rest.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from apt.core.config import (
    CallbackSpec,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    MonitoringConfig,
    SchedulesConfig,
    TrainingConfig,
)
from apt.core.errors import ConfigError, DataError
from apt.trainops.artifacts import RunFolderError, is_inside
from apt.trainops.checkpoints import (
    CheckpointManager,
    GatheredStatePayload,
    Payload,
    ShardedStatePayload,
)
from apt.trainops.distributed import DistEnv, SideChannel, Strategy
from apt.trainops.engine.bundle import TrainingBundle
from apt.trainops.engine.callbacks.base import Callback, CallbackManager
from apt.trainops.engine.callbacks.builtin import ProgressBar
from apt.trainops.engine.callbacks.curriculum import ScheduleCallback
from apt.trainops.engine.callbacks.metrics import MetricsLogger
from apt.trainops.engine.callbacks.registry import build_callbacks as build_configured
from apt.trainops.engine.checkpointing import RunCheckpoints, RunRecord
from apt.trainops.engine.loop import LoopPlan
from apt.trainops.engine.tasks import TrainingTask
from apt.trainops.eval import PaddedForRanks, pad_collate

__all__ = [
    "build_callbacks",
    "build_checkpoints",
    "build_loaders",
    "checkpoint_dir",
    "plan_loop",
]

log = logging.getLogger("apt")


def build_loaders(
    cfg: DataConfig,
    *,
    task: TrainingTask,
    strategy: Strategy,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    train_loader: Any = None,
    eval_loader: Any = None,
    train_dataset: Dataset[Any] | None = None,
    eval_dataset: Dataset[Any] | None = None,
) -> tuple[Any, Any]:
    """(train, eval) loaders: the ones given, else over the datasets given, else over the
    task's datasets built from ``cfg``. Each rank reads its shard; a validation set is padded
    with target-free samples to a multiple of the ranks (every rank runs as many batches).
    Batches are joined by ``task.collate(cfg)`` when the task has one."""
    from apt.trainops.data import create_dataloader

    rank, world = strategy.sampler_rank_world()
    collate_fn = task.collate(cfg)

    def loader(
        dataset: Dataset[Any], size: int, *, shuffle: bool, collate: Any = None
    ) -> DataLoader[Any]:
        return create_dataloader(
            dataset,
            batch_size=size,
            num_workers=cfg.num_workers,
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world,
            drop_last=shuffle,
            collate_fn=collate,
        )

    if train_loader is None:
        if train_dataset is None:
            train_dataset, built_eval = task.build_datasets(cfg, seed=seed)
            eval_dataset = eval_dataset if eval_dataset is not None else built_eval
        train_loader = loader(train_dataset, batch_size, shuffle=cfg.shuffle, collate=collate_fn)
    if eval_loader is None and eval_dataset is not None:
        if (
            world > 1
            and isinstance(eval_dataset, Sized)
            and len(eval_dataset) % world
            and task.can_pad
        ):
            eval_dataset = PaddedForRanks(eval_dataset, world, task.without_targets)
        # A padding row has labels that a real row may lack: pad_collate makes them alike
        # (a task's own collate must handle padding rows itself).
        collate = collate_fn
        if collate is None and isinstance(eval_dataset, PaddedForRanks):
            collate = pad_collate
        eval_loader = loader(eval_dataset, eval_batch_size, shuffle=False, collate=collate)
    return train_loader, eval_loader


def plan_loop(cfg: TrainingConfig, evaluation: EvalConfig, *, batches: int | None) -> LoopPlan:
    """How long the run is and how often it evaluates, from ``batches`` micro-batches per
    epoch (None: a loader without a length).

    Raises:
        ConfigError: the loader has no length and ``max_steps`` is not set.
        DataError: an epoch holds fewer micro-batches than one optimizer step.
    """
    accumulation = cfg.gradient_accumulation_steps
    if batches is None and cfg.max_steps is None:
        raise ConfigError("the training loader has no length: set training.max_steps")
    steps_per_epoch = batches // accumulation if batches is not None else cfg.max_steps or 0
    if steps_per_epoch < 1:
        raise DataError(
            f"the training data gives {batches} batch(es) of {cfg.batch_size} per process, "
            f"fewer than one optimizer step ({accumulation} micro-batches); add data or lower "
            "training.batch_size / gradient_accumulation_steps"
        )
    limits = [cfg.max_steps or math.inf]
    if cfg.num_epochs is not None:
        limits.append(cfg.num_epochs * steps_per_epoch)
    return LoopPlan(
        total_steps=int(min(limits)),
        steps_per_epoch=steps_per_epoch,
        num_epochs=cfg.num_epochs,
        accumulation=accumulation,
        batch_size=cfg.batch_size,
        max_grad_norm=cfg.max_grad_norm,
        eval_interval=evaluation.interval,
        eval_at_start=evaluation.at_start,
        on_nonfinite=cfg.on_nonfinite,
        max_skipped_steps=cfg.max_skipped_steps,
        monitor=evaluation.monitor,
        mode=evaluation.mode,
    )


def build_callbacks(
    cfg: MonitoringConfig,
    *,
    specs: list[CallbackSpec],
    schedules: SchedulesConfig,
    evaluation: EvalConfig,
    metrics: MetricsLogger,
    extra: list[Callback],
    origin: Callable[[int], str] | None = None,
) -> CallbackManager:
    """The progress bar (``cfg``) and the metrics logger, the curriculum when ``schedules`` is
    set, the configured ``specs``, then the caller's own callbacks, in that order.

    Callbacks built from ``specs`` are handed, when their constructor takes them, the
    metrics logger's ``sink``, the ``schedules`` and the ``evaluation`` section.
    ``origin(i)`` says where ``specs[i]`` was written (for error messages)."""
    built: list[Callback] = []
    if cfg.progress_bar:
        built.append(ProgressBar())
    built.append(metrics)
    if schedules.root and "schedule" not in {spec.name for spec in specs}:
        built.append(ScheduleCallback(schedules=schedules))
    built += build_configured(
        specs, origin=origin, sink=metrics.sink, schedules=schedules, evaluation=evaluation
    )
    return CallbackManager(built + list(extra))


def checkpoint_dir(cfg: CheckpointConfig, *, run_dir: Path) -> Path:
    """Where the run's checkpoints go: ``cfg.directory`` as given (relative to the working
    directory), or ``<run_dir>/checkpoints`` when it is not set.

    Raises:
        ConfigError: a relative ``directory`` that climbs out of the working directory with
            ``..``: where it lands depends on where the command is started, so it is refused;
            an absolute path says the same thing unambiguously.
    """
    if not cfg.directory:
        return run_dir / "checkpoints"
    given = Path(cfg.directory)
    if not given.is_absolute() and Path(os.path.normpath(given)).parts[:1] == ("..",):
        raise ConfigError(
            f"training.checkpoints.directory: {cfg.directory!r} climbs out of the working "
            f"directory (it would be {Path(os.path.abspath(given))}). A relative directory is "
            "relative to the working directory and may not leave it; give an absolute path to "
            "write checkpoints there, or leave it unset for <run folder>/checkpoints."
        )
    return given


def build_checkpoints(
    cfg: CheckpointConfig,
    *,
    run_dir: Path,
    env: DistEnv,
    strategy: Strategy,
    side: SideChannel | None,
    bundle: TrainingBundle,
    callbacks: CallbackManager,
    record: RunRecord,
    allow_config_change: bool,
    export_final: Callable[[], None] | None,
) -> RunCheckpoints:
    """The run's checkpoints: a :class:`CheckpointManager` that owns ``cfg`` (into
    :func:`checkpoint_dir`: ``cfg.directory`` as given, relative to the working directory, or
    ``<run_dir>/checkpoints``), each rank writing its shard under a sharded strategy, and the
    run's save/resume around it. A folder outside the run folder is logged (rank 0).

    ``side`` is a gloo channel of every rank (None in one process): the async writer thread and
    DCP coordinate on it, never on the training group.

    Raises:
        ConfigError: a relative ``cfg.directory`` that climbs out of the working directory.
        RunFolderError: the checkpoint folder cannot be created.
    """
    save_dir = checkpoint_dir(cfg, run_dir=run_dir)
    if env.is_main and not is_inside(save_dir, run_dir):
        log.info("checkpoints: %s (outside the run folder)", Path(os.path.abspath(save_dir)))
    payload: Payload = (
        ShardedStatePayload(strategy, side.group if side else None)
        if strategy.sharded
        else GatheredStatePayload(strategy)
    )
    try:
        manager = CheckpointManager(
            cfg,
            save_dir=save_dir,
            is_writer=env.is_main,
            barrier=side.barrier if side else None,
            agree=side.agree if side else None,
            rank=env.rank,
            world_size=env.world_size,
            payload=payload,
        )
    except OSError as exc:  # the writer creates the folder
        raise RunFolderError(
            f"training.checkpoints.directory: cannot create the checkpoint folder "
            f"{Path(os.path.abspath(save_dir))}: {exc.strerror} ({exc.filename}). Choose a "
            "folder you can write, or leave the key unset for <run folder>/checkpoints."
        ) from None
    return RunCheckpoints(
        manager,
        bundle=bundle,
        callbacks=callbacks,
        record=record,
        allow_config_change=allow_config_change,
        export_final=export_final,
    )
