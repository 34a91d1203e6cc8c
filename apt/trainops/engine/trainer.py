"""``Trainer``: builds every part of a run from a config (or takes yours), then runs the loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from apt.core.config import APTConfig
from apt.core.cpus import default_cpu_threads
from apt.core.errors import CheckpointError, ConfigError
from apt.core.logs import install_console_logging
from apt.model.layers.lora import merged_state_dict
from apt.trainops.artifacts import ArtifactManager, ExportError
from apt.trainops.data.build import data_tokenizer
from apt.trainops.data.tokenizers import Tokenizer, token_byte_lengths
from apt.trainops.distributed import (
    SideChannel,
    build_strategy,
    data_parallel_sums,
    distributed_errors,
    setup_distributed,
)
from apt.trainops.engine.base_model import (
    check_model_tokenizer,
    start_from_base,
    with_given_model,
)
from apt.trainops.engine.builders import (
    build_callbacks,
    build_checkpoints,
    build_loaders,
    checkpoint_dir,
    plan_loop,
)
from apt.trainops.engine.bundle import TrainingBundle
from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.engine.callbacks.metrics import MetricsLogger
from apt.trainops.engine.checkpointing import RunRecord
from apt.trainops.engine.events import Event
from apt.trainops.engine.float8 import apply_float8
from apt.trainops.engine.freeze import (
    FinetunePlan,
    apply_finetune,
    check_align_strategy,
    export_adapter,
)
from apt.trainops.engine.keywords import LENGTH_KEYWORDS, config_with_keywords
from apt.trainops.engine.loop import TrainingLoop
from apt.trainops.engine.precision import make_autocast, make_grad_scaler, seed_everything
from apt.trainops.engine.preflight import check_ranks_agree, warn_if_made_for_gpus
from apt.trainops.engine.run_claim import claim_run_folder
from apt.trainops.engine.signals import graceful_exit
from apt.trainops.engine.state import TrainState
from apt.trainops.engine.tasks import TrainingTask, build_task
from apt.trainops.engine.vocab import fit_vocab_size
from apt.trainops.eval import Evaluator
from apt.trainops.monitoring import (
    build_monitor,
    flops_per_token,
    multiplying_parameters,
    peak_flops,
)

__all__ = ["TrainResult", "Trainer"]

log = logging.getLogger("apt")


@dataclass
class TrainResult:
    """What :meth:`Trainer.train` returns.

    Attributes:
        global_step: optimizer steps done in total (resumed steps included).
        run_dir: the run folder.
        metrics: ``train_loss``, ``val_loss_initial``, ``val_loss_final`` and the latest values.
        finished: the run reached its planned end (False after an exit request).
        exit_signal: the signal (SIGTERM, SIGINT) that ended the run early, if any.
        steps_run: optimizer steps this call trained (0 for a run that was complete already).
        export_error: why the final model was not exported, when its export failed under
            ``training.checkpoints.on_save_error: continue`` (None otherwise).
    """

    global_step: int
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = True
    exit_signal: int | None = None
    steps_run: int = 0
    export_error: str | None = None


class Trainer:
    """Trains a model: ``Trainer.from_config(cfg).train()`` or keyword construction.

    Keyword construction (``Trainer(model=m, train_dataloader=dl, max_steps=100,
    learning_rate=3e-4)``) sets each keyword at its config key
    (:data:`~apt.trainops.engine.keywords.KEYWORDS`) on top of ``config`` (default: the
    schema's defaults); anything not passed (model, data) is built from the config by the task.

    Args:
        model: your model; default: ``task.build_model(cfg.model)``.
        train_dataloader / eval_dataloader: your loaders; default: built from the datasets.
        train_dataset / eval_dataset: your datasets; default: ``task.build_datasets(cfg.data)``.
        config: a validated :class:`APTConfig`.
        callbacks: extra callbacks, run after the built-in and configured ones.
        allow_config_change: resume even when resume-critical config keys changed.
        new_run: move an existing run folder aside (``<name>-<timestamp>``) and start afresh.
        task: a task instance, or a task name / spec (default: ``training.task``).
        **keywords: config shortcuts: max_steps, num_epochs, learning_rate, batch_size,
            gradient_accumulation_steps, max_grad_norm, precision, device, seed, compile,
            auto_resume, checkpoint_dir (relative to the working directory), save_interval,
            distributed_config, eval_interval, output_dir, experiment_name.

    Attributes:
        bundle: what the run trains (model, optimizer, lr_scheduler, scaler, extras).
        finetune_plan: what ``finetune:`` did to the model (adapters, frozen names, the align
            reference), or None.
    """

    #: Config defaults of this trainer kind (keyword -> value), applied under the caller's own
    #: keywords when no ``config`` is given. A run length the caller gives (max_steps or
    #: num_epochs) replaces the default length rather than racing it.
    keyword_defaults: ClassVar[dict[str, Any]] = {}

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
        task_obj = keywords.pop("task") if isinstance(keywords.get("task"), TrainingTask) else None
        if config is None:
            defaults = dict(self.keyword_defaults)
            if any(keywords.get(k) is not None for k in LENGTH_KEYWORDS):
                defaults = {k: v for k, v in defaults.items() if k not in LENGTH_KEYWORDS}
            keywords = {**defaults, **keywords}
        cfg = config_with_keywords(config, keywords)
        if cfg.finetune.base_model is not None:
            if model is not None:
                raise ConfigError(
                    f"finetune.base_model is {cfg.finetune.base_model!r} and a model was passed "
                    "too; give one: drop model=, or unset finetune.base_model."
                )
            cfg, model = start_from_base(cfg)
        elif model is not None:
            cfg = with_given_model(cfg, model)
        # The tokenizer of the config's data (or of vocab_size: auto): it sizes the model,
        # counts val_bpb, and travels with the model and the run folder.
        own_data = train_dataloader is None and train_dataset is None
        self.tokenizer: Tokenizer | None = None
        if own_data or cfg.model.vocab_size == "auto":
            self.tokenizer = data_tokenizer(cfg.data)
            if model is not None:
                check_model_tokenizer(model, self.tokenizer)
            cfg = fit_vocab_size(cfg, self.tokenizer)
        self.config = cfg
        tcfg = cfg.training
        self.env = env = setup_distributed(
            tcfg.distributed.backend,
            timeout_seconds=tcfg.distributed.timeout_seconds,
            expected_world_size=tcfg.distributed.world_size,
            device=tcfg.device,
        )
        self.device = env.device
        install_console_logging(main=env.is_main)
        if env.world_size > 1:
            check_ranks_agree(cfg, env.rank)
        torch.set_num_threads(
            tcfg.cpu_threads
            or default_cpu_threads(processes=env.local_world_size, workers=cfg.data.num_workers)
        )
        seed_everything(tcfg.seed, deterministic=tcfg.deterministic)
        self.task: TrainingTask = task_obj or build_task(tcfg.task)
        self.artifacts = ArtifactManager(cfg.artifacts, is_main=env.is_main)
        self.run_dir = self.artifacts.run_dir
        self._checkpoint_dir = checkpoint_dir(tcfg.checkpoints, run_dir=self.run_dir)
        self._claimed = False  # the same on every rank: whether train() must claim again
        self.export_error: str | None = None
        # Before the model is built (a refused second process must not take device memory the
        # running one needs) and before anything reads or writes the run folder.
        self._claim_run_folder(new_run=new_run)
        try:
            self._assemble(
                model,
                train_dataloader=train_dataloader,
                eval_dataloader=eval_dataloader,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                callbacks=callbacks,
                allow_config_change=allow_config_change,
                new_run=new_run,
            )
        except BaseException:
            self.artifacts.unlock()
            raise

    def _assemble(
        self,
        model: nn.Module | None,
        *,
        train_dataloader: Any,
        eval_dataloader: Any,
        train_dataset: Dataset[Any] | None,
        eval_dataset: Dataset[Any] | None,
        callbacks: list[Callback] | None,
        allow_config_change: bool,
        new_run: bool,
    ) -> None:
        """Build the model, strategy, loaders, optimizer, callbacks and checkpoints of the run
        (the run folder is held already)."""
        cfg, tcfg, env = self.config, self.config.training, self.env
        raw_model = model if model is not None else self.task.build_model(cfg.model)
        warn_if_made_for_gpus(tcfg, raw_model, env.device)
        # LoRA layers and requires_grad first: the strategy shards, and the optimizer sees,
        # the parameters that train; a checkpoint holds the adapters as model state. Then the
        # finetune.align reference, the model as it is before the first step (a resumed run
        # loads the checkpoint's over it).
        self.finetune_plan: FinetunePlan | None = (
            apply_finetune(cfg.finetune, model=raw_model) if cfg.finetune.active else None
        )
        # Before the strategy wraps or shards it: FP8 swaps nn.Linear modules.
        self.float8_layers = apply_float8(raw_model, tcfg.float8, env.device)
        if self.tokenizer is not None and getattr(raw_model, "tokenizer", False) is None:
            # An APT model without a tokenizer gets the data's: its exports carry it.
            setattr(raw_model, "tokenizer", self.tokenizer)  # noqa: B010 (typed nn.Module)
        self.strategy = build_strategy(tcfg.distributed, env=env, precision=tcfg.precision)
        tcfg.distributed.check_sequence_length(cfg.data.seq_len, tp=self.strategy.dims.tp)
        check_align_strategy(
            cfg.finetune,
            model=raw_model,
            strategy=self.strategy.name,
            sharded=self.strategy.sharded,
        )
        # One gloo channel for the loop's host sums, one for checkpoint coordination (the
        # async writer thread): collectives from two threads must not share a group.
        timeout = tcfg.distributed.timeout_seconds
        self.sums = data_parallel_sums(self.strategy.dims, rank=env.rank, timeout_seconds=timeout)
        # The strategy places the model: FSDP moves it shard by shard, so the whole model never
        # has to fit on one device.
        trained = self.strategy.apply(raw_model)
        if tcfg.compile:
            trained = self.strategy.compile(trained, tcfg.compile_mode, tcfg.compile_options)
        self.train_loader, self.eval_loader = build_loaders(
            cfg.data,
            task=self.task,
            strategy=self.strategy,
            batch_size=tcfg.batch_size,
            eval_batch_size=cfg.eval.batch_size or tcfg.batch_size,
            seed=tcfg.seed,
            train_loader=train_dataloader,
            eval_loader=eval_dataloader,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )
        # val_bpb needs the bytes each token stands for: known for the config's own corpus.
        own_eval_data = eval_dataloader is None and eval_dataset is None
        own_data = own_eval_data and train_dataloader is None and train_dataset is None
        counts_bytes = hasattr(self.task, "count_target_bytes")  # causal_lm; not regression
        self._token_bytes = (
            token_byte_lengths(self.tokenizer)
            if own_data and counts_bytes and self.tokenizer is not None
            else None
        )
        self.plan = plan_loop(tcfg, cfg.eval, batches=_length(self.train_loader))
        optimizer = self.task.build_optimizer(
            tcfg.optimizer, model=trained, learning_rate=tcfg.learning_rate
        )
        self.bundle = TrainingBundle(
            model=trained,
            optimizer=optimizer,
            lr_scheduler=self.task.build_scheduler(
                tcfg.scheduler, optimizer=optimizer, total_steps=self.plan.total_steps
            ),
            scaler=make_grad_scaler(tcfg.precision, self.device),
        )
        self.autocast = make_autocast(tcfg.precision, self.device)
        self.monitor = build_monitor(
            cfg.monitoring,
            run_dir=self.run_dir,
            output_dir=self.artifacts.output_dir,
            enabled=env.is_main,
        )
        self.callbacks = build_callbacks(
            cfg.monitoring,
            specs=cfg.callbacks,
            schedules=cfg.schedules,
            evaluation=cfg.eval,
            metrics=MetricsLogger(
                cfg.monitoring.log_interval,
                sink=self.monitor.log,
                flops_per_token=self._flops_per_token(raw_model, built_here=model is None),
                peak_flops=peak_flops(env.device, cfg.monitoring.peak_flops),
                world_size=env.world_size,
                reduce_max=self.sums.host_max if env.world_size > 1 else None,
                reduce_sum=self.sums.host if env.world_size > 1 else None,
                device=self.device,
            ),
            extra=callbacks or [],
            origin=lambda i: cfg.origin_of(f"callbacks.{i}"),
        )
        self.state = TrainState()
        if new_run and (moved := self.artifacts.archive_existing()) is not None:
            log.info("new run: moved the previous run folder to %s; starting afresh", moved)
        self.checkpoints = build_checkpoints(
            tcfg.checkpoints,
            run_dir=self.run_dir,
            env=env,
            strategy=self.strategy,
            side=SideChannel(timeout) if env.world_size > 1 else None,
            bundle=self.bundle,
            callbacks=self.callbacks,
            # The data cursor counts batches of the data-parallel ranks (tp ranks share one).
            record=RunRecord.of(cfg, self.strategy.dims.dp_size),
            allow_config_change=allow_config_change,
            export_final=self._export_final if cfg.artifacts.save_final_model else None,
        )

    def _flops_per_token(self, model: nn.Module, *, built_here: bool) -> float:
        """Training FLOPs per token for the MFU estimate: 6 x the parameters that multiply
        (every one but an embedding table that is only looked up; a table tied to the output
        head multiplies there, so it counts), 4 x for frozen ones (no weight gradient), plus
        attention's share when the shape is known (a model built from ``cfg.model``)."""
        params = multiplying_parameters(model)
        trainable = multiplying_parameters(model, trainable_only=True)
        if not built_here:
            return flops_per_token(params, trainable_params=trainable)
        shape = self.config.model
        return flops_per_token(
            params,
            trainable_params=trainable,
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            seq_len=self.config.data.seq_len,
        )

    def _claim_run_folder(self, *, new_run: bool) -> None:
        claim_run_folder(
            self.artifacts, env=self.env, checkpoint_dir=self._checkpoint_dir, new_run=new_run
        )
        self._claimed = True

    def close(self) -> None:
        """Release the run folder for other runs (``train()`` does at its end); a later
        ``train()`` takes it again."""
        self.artifacts.close()
        self.artifacts.unlock()
        self._claimed = False

    @classmethod
    def from_config(
        cls, config: APTConfig, *, callbacks: list[Callback] | None = None, **kwargs: Any
    ) -> Trainer:
        """Build everything from ``config`` (``kwargs``: model, loaders or datasets you own)."""
        return cls(config=config, callbacks=callbacks, **kwargs)

    @property
    def model(self) -> nn.Module:
        """The model being trained (wrapped by the strategy; see :meth:`Strategy.unwrap`)."""
        return self.bundle.model

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
            reduce=self.sums.device if self.env.world_size > 1 else None,
            token_bytes=self._token_bytes,
            prefix="val_",
        )

    def _export_final(self) -> None:
        """Write ``final_model/`` under ``training.checkpoints.on_save_error``, as a checkpoint
        save: ``stop`` ends the run (before the final checkpoint, so the same command trains
        the last steps again and exports); ``continue`` warns and the run ends without it."""
        error: str | None = None
        try:
            self.export_model("final_model", step=self.state.global_step)
        except ExportError as exc:
            error = str(exc)
        if self.env.world_size > 1 and self.sums.any_rank(error is not None) and not error:
            error = f"rank {self.env.rank}: the final model export failed on rank 0"
        if error is None:
            return
        if self.config.training.checkpoints.on_save_error == "stop":
            raise CheckpointError(
                f"{error}\nThe run stops (training.checkpoints.on_save_error: stop) before its "
                "final checkpoint; the same command resumes from the newest checkpoint, trains "
                "the last steps again and exports the model."
            )
        log.warning(
            "%s\nThe run ends without final_model (training.checkpoints.on_save_error: "
            "continue); the final checkpoint, if it saves, holds the trained weights.",
            error,
        )
        self.export_error = error

    def export_model(self, directory: str | Path, *, step: int | None = None) -> Path:
        """Write the trained model (``save_pretrained`` format for APT models) into
        ``directory`` (relative paths are inside the run folder). Collective when sharded.

        With ``finetune.lora``: the weights with the adapters merged in (``merge: true``; the
        model being trained keeps its adapters), or only ``adapter_model.safetensors`` and
        ``adapter_config.json`` (``merge: false``).

        Raises:
            ExportError: the files could not be written (disk full, permission denied);
                ``directory`` is left as it was.
        """
        state = None
        if self.strategy.sharded:
            state, _ = self.strategy.full_state_dict(self.model, None)  # gathered on rank 0
        model = self.strategy.unwrap(self.model)
        lora, plan = self.config.finetune.lora, self.finetune_plan
        if lora is not None and plan is not None and self.env.is_main:
            if not lora.merge:  # adapter_model.safetensors + adapter_config.json
                target = self.run_dir / directory
                return export_adapter(
                    model, target, trainable=plan.trainable_base, state=state, step=step
                )
            # New tensors for the merged weights: the trained ones stay as they are.
            state = merged_state_dict(model, state)
        return self.artifacts.save_model(model, directory, state_dict=state, step=step)

    def _resume(self, loop: TrainingLoop) -> bool:
        """Continue from the newest checkpoint; True when the run is already complete."""
        if not self.config.training.auto_resume or self.checkpoints.resume(self.state) is None:
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
        ``training.auto_resume``) and return the result. The run folder is held for the
        run (rank 0: taken by the constructor, again here after an earlier ``train()``) and
        released at its end, also when it fails or is stopped."""
        handed_over = self.env.world_size == 1 and not self.artifacts.locked
        if not self._claimed or handed_over:  # handed over: to a later Trainer of the folder
            self._claim_run_folder(new_run=False)
        self.artifacts.mark_busy(True)
        self.export_error = None
        loop = TrainingLoop(
            self.plan,
            self.bundle,
            task=self.task,
            train_loader=self.train_loader,
            evaluator=self._evaluator(),
            callbacks=self.callbacks,
            strategy=self.strategy,
            checkpoints=self.checkpoints,
            autocast=self.autocast,
            sums=self.sums,
            state=self.state,
        )
        first_step = self.state.global_step
        monitoring = False
        try:
            with distributed_errors(f"training (rank {self.env.rank})"):
                complete = self._resume(loop)
                first_step = self.state.global_step
                if not complete:
                    # rank 0: <run>/logs/train.log; a finished rerun leaves the folder as it was
                    self.artifacts.attach_log_file()
                    log.info(
                        "training %s from step %d to step %d",
                        self.run_dir,
                        first_step,
                        self.plan.total_steps,
                    )
                    # Only a run that trains records its config: a refused or finished rerun
                    # leaves the run folder as it was.
                    self.artifacts.save_config(self.config.to_dict(), self.config.provenance)
                    if self.tokenizer is not None:
                        self.artifacts.save_tokenizer(self.tokenizer)
                    self.artifacts.save_environment(
                        {"world_size": self.env.world_size, "device": str(self.device)}
                    )
                    self.monitor.start(
                        self.config.artifacts.experiment_name,
                        start_step=self.state.global_step,
                        hparams=self.config.to_dict(),
                    )
                    monitoring = True
                    with graceful_exit(loop.request_exit):
                        loop.run()
                self.checkpoints.finish()
                if not complete:
                    self.artifacts.save_plots()
        finally:
            if monitoring:
                self.monitor.finish()
            self.artifacts.mark_busy(False)
            self.artifacts.close()
            self._claimed = False
            if not self.checkpoints.manager.busy:
                # A save still being written (an error ended the run) keeps the folder until
                # this process ends: no other run may clean up its stage meanwhile.
                self.artifacts.unlock()
        metrics = dict(self.state.metrics)
        metrics["train_loss"] = float(self.state.last_loss)
        return TrainResult(
            global_step=self.state.global_step,
            run_dir=self.run_dir,
            metrics=metrics,
            finished=self.state.finished,
            exit_signal=loop.exit_signal,
            steps_run=self.state.global_step - first_step,
            export_error=self.export_error,
        )


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None
