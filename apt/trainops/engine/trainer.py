"""``Trainer``: builds every component from a config (or takes yours) and runs the one loop."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from apt.core.config import APTConfig, config_from_dict
from apt.core.errors import ConfigError, DataError
from apt.trainops.artifacts import ArtifactManager
from apt.trainops.checkpoints import (
    CheckpointManager,
    GatheredStatePayload,
    Payload,
    ShardedStatePayload,
)
from apt.trainops.distributed import (
    SideChannel,
    build_strategy,
    distributed_errors,
    setup_distributed,
)
from apt.trainops.engine.callbacks.base import Callback, CallbackManager
from apt.trainops.engine.callbacks.builtin import MetricsLogger, ProgressBar
from apt.trainops.engine.callbacks.curriculum import ScheduleCallback
from apt.trainops.engine.callbacks.registry import build_callbacks
from apt.trainops.engine.checkpointing import RunCheckpoints
from apt.trainops.engine.events import Event
from apt.trainops.engine.loop import LoopPlan, TrainingLoop, sum_over_ranks
from apt.trainops.engine.precision import make_autocast, make_grad_scaler, seed_everything
from apt.trainops.engine.signals import graceful_exit
from apt.trainops.engine.state import TrainState
from apt.trainops.engine.tasks import TASKS, TrainingTask
from apt.trainops.eval import Evaluator, PaddedForRanks

__all__ = ["Finetuner", "PreTrainer", "TrainResult", "Trainer"]

log = logging.getLogger("apt")

#: Trainer keyword -> dotted config key (keyword construction, as in the design notes).
_KEYWORDS = {
    "max_steps": "training.max_steps",
    "num_epochs": "training.num_epochs",
    "learning_rate": "training.learning_rate",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "max_grad_norm": "training.max_grad_norm",
    "precision": "training.precision",
    "device": "training.device",
    "seed": "training.seed",
    "compile": "training.compile",
    "task": "training.task",
    "auto_resume": "training.auto_resume",
    "checkpoint_dir": "training.checkpoints.directory",
    "save_interval": "training.checkpoints.save_interval",
    "distributed_config": "training.distributed",
    "eval_interval": "eval.interval",
    "output_dir": "artifacts.output_dir",
    "experiment_name": "artifacts.experiment_name",
}


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    Attributes:
        global_step: optimizer steps done in total (resumed steps included).
        run_dir: the run folder.
        metrics: ``train_loss``, ``val_loss_initial``, ``val_loss_final`` and the latest values.
        finished: the run reached its planned end (False after an exit request).
        exit_signal: the signal (SIGTERM, SIGINT) that ended the run early, if any.
    """

    global_step: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = True
    exit_signal: int | None = None


def _with_keywords(config: APTConfig | None, keywords: dict[str, Any]) -> APTConfig:
    data = config.model_dump(mode="json", exclude_unset=False) if config is not None else {}
    if config is None and keywords.get("max_steps") is None and keywords.get("num_epochs") is None:
        keywords = {**keywords, "num_epochs": 1}
    for key, value in keywords.items():
        if value is None:
            continue
        node = data
        *parents, leaf = _KEYWORDS[key].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            value = {**node[leaf], **value}
        node[leaf] = value
    if config is not None and not keywords:
        return config
    if (
        data.get("training", {}).get("max_steps")
        and keywords.get("num_epochs") is None
        and config is None
    ):
        data["training"].pop("num_epochs", None)
    return config_from_dict(data, source="Trainer(...) keywords")


def _check_ranks_agree(cfg: APTConfig, rank: int) -> None:
    """Every rank must train the same config into the same run folder."""
    import torch.distributed as dist

    mine = (cfg.fingerprint(), f"{cfg.artifacts.output_dir}/{cfg.artifacts.experiment_name}")
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, mine)
    if any(other != mine for other in seen):
        differing = sorted(
            {f"rank {r}: run folder {s[1]}, config {s[0][:12]}" for r, s in enumerate(seen)}
        )
        raise ConfigError(
            f"rank {rank}: the processes were started with different configs:\n  "
            + "\n  ".join(differing)
            + "\nStart every rank with the same profile and --set overrides."
        )


class Trainer:
    """Trains a model: ``Trainer.from_config(cfg).train()`` or keyword construction.

    Keyword construction (``Trainer(model=m, train_dataloader=dl, max_steps=100,
    learning_rate=3e-4)``) starts from the default config and applies the keywords; anything
    not passed (model, data) is built from the config by the task.

    Args:
        model: your model; default: ``task.build_model(cfg.model)``.
        train_dataloader / eval_dataloader: your loaders; default: built from the datasets.
        train_dataset / eval_dataset: your datasets; default: ``task.build_datasets(cfg.data)``.
        config: a validated :class:`APTConfig`.
        callbacks: extra callbacks, run after the built-in and configured ones.
        allow_config_change: resume even when resume-critical config keys changed.
        new_run: move an existing run folder aside (``<name>-<timestamp>``) and start afresh.
        task: a task instance (default: the one named by ``training.task``).
        **keywords: config shortcuts: max_steps, num_epochs, learning_rate, batch_size,
            gradient_accumulation_steps, max_grad_norm, precision, device, seed, compile, task,
            auto_resume, checkpoint_dir, save_interval, distributed_config, eval_interval,
            output_dir, experiment_name.
    """

    #: Keyword defaults of this trainer kind, used when no ``config`` is given (subclasses
    #: such as :class:`Finetuner` change defaults, never the loop).
    keyword_defaults: dict[str, Any] = {}

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        train_dataloader: Any = None,
        eval_dataloader: Any = None,
        train_dataset: Dataset[Any] | None = None,
        eval_dataset: Dataset[Any] | None = None,
        config: APTConfig | None = None,
        callbacks: list[Callback] | None = None,
        allow_config_change: bool = False,
        new_run: bool = False,
        **keywords: Any,
    ) -> None:
        task_obj = keywords.pop("task", None) if not isinstance(keywords.get("task"), str) else None
        unknown = sorted(set(keywords) - set(_KEYWORDS))
        if unknown:
            raise ConfigError(
                f"Trainer() got unknown keyword(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(_KEYWORDS))} (or pass config=load_profile(...))"
            )
        if config is None:
            keywords = {**self.keyword_defaults, **keywords}
        self.config = cfg = _with_keywords(config, keywords)
        tcfg = cfg.training
        dcfg = tcfg.distributed
        self.env = setup_distributed(
            dcfg.backend,
            timeout_seconds=dcfg.timeout_seconds,
            expected_world_size=dcfg.world_size,
            device=tcfg.device,
        )
        self.device = self.env.device
        if self.env.world_size > 1:
            _check_ranks_agree(cfg, self.env.rank)
        seed_everything(tcfg.seed, deterministic=tcfg.deterministic)
        self.task: TrainingTask = task_obj or TASKS.get(tcfg.task)()
        self.artifacts = ArtifactManager(cfg.artifacts, is_main=self.env.is_main)
        self.run_dir = self.artifacts.run_dir

        raw_model = model if model is not None else self.task.build_model(cfg.model)
        self.strategy = build_strategy(tcfg.distributed, env=self.env, precision=tcfg.precision)
        self._host_channel = (
            SideChannel(tcfg.distributed.timeout_seconds) if self.env.world_size > 1 else None
        )
        # The strategy places the model: FSDP moves it shard by shard, so the whole model never
        # has to fit on one device.
        self.model = self.strategy.apply(raw_model)
        if tcfg.compile:
            self.model = self.strategy.compile(self.model)

        self.train_loader, self.eval_loader = self._build_loaders(
            train_dataloader, eval_dataloader, train_dataset, eval_dataset
        )
        self.plan = self._plan()
        self.optimizer = self.task.build_optimizer(
            tcfg.optimizer, model=self.model, learning_rate=tcfg.learning_rate
        )
        self.lr_scheduler = self.task.build_scheduler(
            tcfg.scheduler, optimizer=self.optimizer, total_steps=self.plan.total_steps
        )
        self.scaler = make_grad_scaler(tcfg.precision, self.device)
        self.autocast = make_autocast(tcfg.precision, self.device)
        self.callbacks = CallbackManager(self._build_callbacks(callbacks or []))
        self.state = TrainState()
        if new_run:
            self.artifacts.archive_existing()
        self.checkpoints = self._build_checkpoints(allow_config_change)
        self._loop: TrainingLoop | None = None

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_config(
        cls, config: APTConfig, *, callbacks: list[Callback] | None = None, **kwargs: Any
    ) -> Trainer:
        """Build everything from ``config`` (``kwargs``: model, loaders or datasets you own)."""
        return cls(config=config, callbacks=callbacks, **kwargs)

    def _build_loaders(
        self, train_dl: Any, eval_dl: Any, train_ds: Any, eval_ds: Any
    ) -> tuple[Any, Any]:
        cfg = self.config
        if train_dl is None:
            if train_ds is None:
                train_ds, built_eval = self.task.build_datasets(cfg.data, seed=cfg.training.seed)
                eval_ds = eval_ds if eval_ds is not None else built_eval
            train_dl = self._loader(train_ds, cfg.training.batch_size, shuffle=cfg.data.shuffle)
        if eval_dl is None and eval_ds is not None:
            world = self.env.world_size
            if world > 1 and len(eval_ds) % world and self.task.can_pad:
                eval_ds = PaddedForRanks(eval_ds, world, self.task.without_targets)
            eval_dl = self._loader(
                eval_ds, cfg.eval.batch_size or cfg.training.batch_size, shuffle=False
            )
        return train_dl, eval_dl

    def _loader(self, dataset: Dataset[Any], batch_size: int, *, shuffle: bool) -> DataLoader[Any]:
        from apt.trainops.data import create_dataloader

        rank, world = self.strategy.sampler_rank_world()
        return create_dataloader(
            dataset,
            batch_size=batch_size,
            num_workers=self.config.data.num_workers,
            shuffle=shuffle,
            seed=self.config.training.seed,
            rank=rank,
            world_size=world,
            drop_last=shuffle,
        )

    def _plan(self) -> LoopPlan:
        tcfg = self.config.training
        accumulation = tcfg.gradient_accumulation_steps
        try:
            batches = len(self.train_loader)
        except TypeError:
            batches = None
        if batches is None and tcfg.max_steps is None:
            raise ConfigError("the training loader has no length: set training.max_steps")
        steps_per_epoch = (batches // accumulation) if batches is not None else tcfg.max_steps or 0
        if steps_per_epoch < 1:
            raise DataError(
                f"the training data gives {batches} batch(es) of {tcfg.batch_size} per process, "
                f"fewer than one optimizer step ({accumulation} micro-batches); add data or lower "
                "training.batch_size / gradient_accumulation_steps"
            )
        limits = [tcfg.max_steps or math.inf]
        if tcfg.num_epochs is not None:
            limits.append(tcfg.num_epochs * steps_per_epoch)
        return LoopPlan(
            total_steps=int(min(limits)),
            steps_per_epoch=steps_per_epoch,
            num_epochs=tcfg.num_epochs,
            accumulation=accumulation,
            batch_size=tcfg.batch_size,
            max_grad_norm=tcfg.max_grad_norm,
            eval_interval=self.config.eval.interval,
            eval_at_start=self.config.eval.at_start,
            save_interval=tcfg.checkpoints.save_interval,
        )

    def _build_callbacks(self, extra: list[Callback]) -> list[Callback]:
        mon = self.config.monitoring
        runtime = {"sink": self.artifacts.log_metrics, "schedules": self.config.schedules}
        built: list[Callback] = []
        if mon.progress_bar:
            built.append(ProgressBar())
        built.append(MetricsLogger(mon.log_interval, sink=self.artifacts.log_metrics))
        named = {spec.name for spec in self.config.callbacks}
        if self.config.schedules.root and "schedule" not in named:
            built.append(ScheduleCallback(schedules=self.config.schedules))
        built += build_callbacks(self.config.callbacks, **runtime)
        return built + list(extra)

    # ------------------------------------------------------------------------- training
    def _evaluator(self) -> Evaluator | None:
        if self.eval_loader is None:
            return None
        return Evaluator(
            model=self.model,
            dataloader=self.eval_loader,
            task=self.task,
            max_batches=self.config.eval.max_batches,
            device=self.device,
            autocast=self.autocast,
            reduce=(lambda t: sum_over_ranks(t, self.device)) if self.env.world_size > 1 else None,
        )

    def _save(self, reason: str) -> None:
        loop = self._loop
        assert loop is not None
        # The final model first: once the final checkpoint is committed a rerun only says
        # "run already complete", so everything a finished run promises must exist by then.
        if reason == "final" and self.config.artifacts.save_final_model:
            self.export_model("final_model")
        if self.checkpoints is not None:
            self.checkpoints.save(
                self.state,
                model=self.model,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                scaler=self.scaler,
                on_saved=lambda: loop.fire(Event.CHECKPOINT_SAVE),
            )
            if reason != "interval":  # the run ends after this save: wait for its commit
                self.checkpoints.finish()

    def export_model(self, directory: str | Path) -> Path:
        """Write the trained model (``save_pretrained`` format for APT models) into
        ``directory`` (relative paths are inside the run folder). Collective when sharded."""
        state = None
        if self.strategy.sharded:
            state, _ = self.strategy.full_state_dict(self.model, None)  # gathered on rank 0
        return self.artifacts.save_model(
            self.strategy.unwrap(self.model), directory, state_dict=state
        )

    def _build_checkpoints(self, allow_config_change: bool) -> RunCheckpoints:
        ckpt_cfg = self.config.training.checkpoints
        side = None
        if self.env.world_size > 1:
            side = SideChannel(self.config.training.distributed.timeout_seconds)
        payload: Payload = (
            ShardedStatePayload(self.strategy, side.group if side else None)
            if self.strategy.sharded
            else GatheredStatePayload(self.strategy)
        )
        manager = CheckpointManager(
            ckpt_cfg,
            save_dir=self.run_dir / ckpt_cfg.directory,
            is_writer=self.env.is_main,
            barrier=side.barrier if side else None,
            agree=side.agree if side else None,
            rank=self.env.rank,
            world_size=self.env.world_size,
            payload=payload,
        )
        return RunCheckpoints(
            self.config,
            manager=manager,
            callbacks=self.callbacks,
            world_size=self.env.world_size,
            allow_config_change=allow_config_change,
        )

    def _resume(self, loop: TrainingLoop) -> bool:
        """Continue from the newest checkpoint; True when the run is already complete."""
        if self.checkpoints is None or not self.config.training.auto_resume:
            return False
        loaded = self.checkpoints.resume(
            self.state,
            model=self.model,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=self.scaler,
        )
        if loaded is None:
            return False
        loop.fire(Event.CHECKPOINT_LOAD)
        if not self.state.finished:
            return False
        if self.state.stop_reason or self.state.global_step >= self.plan.total_steps:
            log.info(
                "run already complete at step %d (%s); nothing to do. Use --new-run (Trainer("
                "new_run=True)) or another artifacts.experiment_name to train again.",
                self.state.global_step,
                self.run_dir,
            )
            return True
        log.info(
            "extending a finished run from step %d to %d",
            self.state.global_step,
            self.plan.total_steps,
        )
        self.state.finished = False
        return False

    def train(self) -> TrainResult:
        """Run training to the end (resuming from the run folder's newest checkpoint when
        ``training.auto_resume``) and return the result."""
        self.artifacts.prepare()
        loop = self._loop = TrainingLoop(
            self.plan,
            model=self.model,
            task=self.task,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=self.scaler,
            autocast=self.autocast,
            train_loader=self.train_loader,
            evaluator=self._evaluator(),
            callbacks=self.callbacks,
            strategy=self.strategy,
            device=self.device,
            state=self.state,
            save=self._save,
            poll_saves=self.checkpoints.poll if self.checkpoints is not None else None,
            host_sum=self._host_channel.sum if self._host_channel is not None else None,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        try:
            with distributed_errors(f"training (rank {self.env.rank})"):
                complete = self._resume(loop)
                if not complete:
                    # Only a run that trains records its config: a refused or finished rerun
                    # leaves the run folder as it was.
                    self.artifacts.save_config(self.config.to_dict(), self.config.provenance)
                    with graceful_exit(loop.request_exit):
                        loop.run()
                if self.checkpoints is not None:
                    self.checkpoints.finish()
        finally:
            self.artifacts.close()
        metrics = dict(self.state.metrics)
        metrics["train_loss"] = float(self.state.last_loss)
        return TrainResult(
            global_step=self.state.global_step,
            run_dir=self.run_dir,
            metrics=metrics,
            finished=self.state.finished,
            exit_signal=loop.exit_signal,
        )


class Finetuner(Trainer):
    """A Trainer with fine-tuning defaults: ``learning_rate=1e-5``, ``num_epochs=3``.

    >>> finetuner = Finetuner(model=APTLargeModel.from_pretrained(path),   # doctest: +SKIP
    ...                       train_dataset=data, learning_rate=1e-5, num_epochs=3)
    >>> finetuner.finetune()                                               # doctest: +SKIP
    >>> finetuner.save_model("my_finetuned_model")                         # doctest: +SKIP
    """

    keyword_defaults = {"learning_rate": 1e-5, "num_epochs": 3, "experiment_name": "finetune"}

    def finetune(self) -> TrainResult:
        """Fine-tune (the same loop as :meth:`Trainer.train`)."""
        return self.train()

    def save_model(self, directory: str | Path) -> Path:
        """Write the fine-tuned model (``save_pretrained`` format for APT models)."""
        return self.export_model(Path(directory).absolute())


class PreTrainer(Trainer):
    """A Trainer with pre-training defaults (``learning_rate=6e-4``); ``pretrain()`` trains."""

    keyword_defaults = {"learning_rate": 6e-4, "experiment_name": "pretrain"}

    def pretrain(self) -> TrainResult:
        """Pre-train (the same loop as :meth:`Trainer.train`)."""
        return self.train()
