"""The one training loop. Every trainer, task and strategy runs through :class:`TrainingLoop`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from apt.core.errors import DataError, TrainingDiverged
from apt.trainops.distributed import RankSums, Strategy
from apt.trainops.engine.bundle import TrainingBundle
from apt.trainops.engine.callbacks.base import CallbackManager
from apt.trainops.engine.events import Event
from apt.trainops.engine.nonfinite import NonFiniteGuard, Policy
from apt.trainops.engine.state import Control, RunState, TrainState
from apt.trainops.engine.tasks.base import TrainingTask
from apt.trainops.eval import Evaluator, to_device

__all__ = ["LoopPlan", "SavePoints", "TrainingLoop"]

log = logging.getLogger("apt")


@dataclass(frozen=True)
class LoopPlan:
    """How long and how often: derived once from the config and the data size."""

    total_steps: int
    steps_per_epoch: int
    num_epochs: int | None
    accumulation: int
    batch_size: int
    max_grad_norm: float | None
    eval_interval: int | None
    eval_at_start: bool
    on_nonfinite: Policy = "stop"
    max_skipped_steps: int = 10
    monitor: str = "val_loss"
    mode: str = "min"


class SavePoints(Protocol):
    """What the loop asks of checkpointing (the Trainer's is
    :class:`~apt.trainops.engine.checkpointing.RunCheckpoints`)."""

    def due(self, step: int) -> bool:
        """Whether the policy saves at the end of ``step``."""
        ...

    def save(self, state: TrainState, reason: str, *, on_saved: Callable[[], None]) -> None:
        """Save now (``reason``: ``interval``, ``exit`` or ``final``); ``on_saved`` runs once
        the checkpoint is committed."""
        ...

    def poll(self) -> None:
        """Report an async save that finished since (never blocks)."""
        ...

    def finish(self) -> None:
        """Wait for the save in flight and report it."""
        ...


class _StepWork:
    """One step's micro-batches for :meth:`Strategy.forward_backward` (the
    :class:`~apt.trainops.distributed.MicroBatches` protocol): the loop's events, task,
    autocast and scaler around the strategy's work."""

    def __init__(self, loop: TrainingLoop, batches: list[Any], counts: list[int], scale: float):
        self.loop, self.scale = loop, scale
        self.batches: Sequence[Any] = batches
        self.counts: Sequence[int] = counts
        self.stats: dict[str, torch.Tensor] = {}  # this rank's share of the step's statistics
        self._current = 0  # the micro-batch begin() handed out last: the one forward() runs

    def begin(self, i: int) -> Any:
        self.loop.fire(Event.BATCH_START)
        self._current = i
        return to_device(self.batches[i], self.loop.device)

    def forward(self, batch: Any) -> torch.Tensor:
        loop = self.loop
        with loop.autocast():
            out = loop.task.train_step(loop.model, batch, loop.criterion)
        # Weighted as the loss is (scale: ranks / the step's targets on every rank), so the
        # ranks' shares sum to the step's mean over its targets.
        weight = self.counts[self._current] * self.scale / self.loop.sums.world_size
        for name, value in out.stats.items():
            share = value.detach().float() * weight
            self.stats[name] = self.stats[name] + share if name in self.stats else share
        return out.loss

    def backward(self, loss: torch.Tensor) -> None:
        with self.backward_events():
            self.loop.scaler.scale(loss).backward()

    @contextlib.contextmanager
    def backward_events(self) -> Iterator[None]:
        self.loop.fire(Event.BEFORE_BACKWARD)
        yield
        self.loop.fire(Event.AFTER_BACKWARD)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.loop.autocast()

    def token_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loop.task.token_targets(batch)

    def end(self, loss: torch.Tensor) -> None:
        state = self.loop.state
        state.batch_loss = loss.detach()  # read (and synced) only by who looks
        state.batch_in_epoch += 1
        state.micro_batch += 1
        self.loop.fire(Event.BATCH_END)


class TrainingLoop:
    """Runs optimizer steps over the data, firing events and honouring ``Control`` requests.

    The loop knows nothing of model types or parallelism: the task turns batches into losses,
    the strategy supplies ``no_sync`` / ``clip_grad_norm_``, ``sums`` the cross-rank sums, and
    ``checkpoints`` decides and writes saves.

    Args:
        plan: steps, epochs, accumulation and eval cadence.
        bundle: the model, optimizer, LR scheduler and scaler to train (and any extra part).
        task: turns a batch into a loss.
        train_loader: the micro-batches (a resumable sampler is used when it has one).
        evaluator: validation (None: no evaluation).
        callbacks: the event listeners.
        strategy: how the model is spread over ranks.
        checkpoints: when and how to save.
        autocast: a factory of the mixed-precision context.
        sums: sums over the data-parallel ranks.
        state: the counters to continue from (a resume loads into them).
    """

    def __init__(
        self,
        plan: LoopPlan,
        bundle: TrainingBundle,
        *,
        task: TrainingTask,
        train_loader: Any,
        evaluator: Evaluator | None,
        callbacks: CallbackManager,
        strategy: Strategy,
        checkpoints: SavePoints,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        sums: RankSums,
        state: TrainState,
    ) -> None:
        assert bundle.optimizer is not None and bundle.scaler is not None
        self.plan, self.bundle, self.task = plan, bundle, task
        self.model, self.optimizer, self.scaler = bundle.model, bundle.optimizer, bundle.scaler
        self.train_loader, self.evaluator, self.callbacks = train_loader, evaluator, callbacks
        self.strategy, self.checkpoints, self.autocast = strategy, checkpoints, autocast
        self.sums, self.state = sums, state
        self.device = strategy.env.device
        self.criterion = task.build_criterion()
        self.control = Control()
        self.exit_requested = False  # agreed by every rank; the loop saves and leaves
        self.exit_signal: int | None = None
        self._local_exit = False  # this process received SIGTERM/SIGINT
        self.view = RunState(
            state,
            bundle,
            rank=strategy.env.rank,
            world_size=sums.world_size,
            max_steps=plan.total_steps,
            steps_per_epoch=plan.steps_per_epoch,
            num_epochs=plan.num_epochs,
        )
        self._last_eval_step: int | None = None
        self.guard = NonFiniteGuard(
            plan.on_nonfinite,
            max_skipped_steps=plan.max_skipped_steps,
            sums=sums,
            check_grad_norm=not self.scaler.is_enabled(),
        )

    def request_exit(self, signum: int) -> None:
        """Ask the loop to save at the next step boundary and return (signal handlers)."""
        self._local_exit = True
        self.exit_signal = signum

    # ----------------------------------------------------------------------------- events
    def fire(self, event: Event) -> None:
        """Run the callbacks of ``event``."""
        self.callbacks.fire(event, self.view, self.control)

    # ----------------------------------------------------------------------------- run
    def run(self) -> None:
        """Train until the plan's end, a stop request or an exit request (SIGTERM)."""
        self.fire(Event.TRAIN_START)
        try:
            self._first_evaluation()
            while not self._done():
                self._run_epoch()
            if not self.exit_requested or self.state.finished:
                self._finish()  # an exit request in the last step still ends the run
        except TrainingDiverged:
            self.checkpoints.finish()  # a save in flight holds a finite state: let it commit
            self.fire(Event.EXCEPTION)
            raise
        except BaseException:
            self.fire(Event.EXCEPTION)
            raise
        self.fire(Event.TRAIN_END)

    def _first_evaluation(self) -> None:
        """The evaluation before the first step, or the one an exit request abandoned (the
        rest of that step's control point follows it: its checkpoint is where we resumed)."""
        state = self.state
        at_start = state.global_step == 0 and state.batch_in_epoch == 0
        if at_start and (self.plan.eval_at_start or state.pending_eval):
            if self.evaluate() is not None and "val_loss" in state.metrics:
                state.metrics["val_loss_initial"] = state.metrics["val_loss"]
        elif state.pending_eval:
            self.evaluate()
            self.control.should_save = False
            self._honour_stop()

    def _done(self) -> bool:
        return (
            self.state.finished
            or self.exit_requested
            or self.state.global_step >= self.plan.total_steps
        )

    def _finish(self) -> None:
        if self._last_eval_step != self.state.global_step and self.evaluate() is None:
            # The final evaluation was abandoned for an exit request: the run is not finished
            # until it ran; the resumed run does it, then the final save.
            self.state.finished = False
            if self.state.global_step > 0:
                self._save("exit")
            return
        if "val_loss" in self.state.metrics:
            self.state.metrics["val_loss_final"] = self.state.metrics["val_loss"]
        self.state.finished = True
        self._save("final")

    def _run_epoch(self) -> None:
        state, plan = self.state, self.plan
        if state.batch_in_epoch == 0:
            self.fire(Event.EPOCH_START)
        batches = self._epoch_batches()
        usable = plan.steps_per_epoch * plan.accumulation
        while state.batch_in_epoch + plan.accumulation <= usable and not self._done():
            self._run_step(batches)
            self._control_point(end_of_epoch=False)
        if state.batch_in_epoch < usable or self.exit_requested:
            # Left mid-epoch (max_steps, stop or exit request), or an exit saved at the epoch's
            # last step: the resumed run ends the epoch (no second save of the same step).
            return
        self.fire(Event.EPOCH_END)
        state.epoch += 1
        state.batch_in_epoch = 0
        if plan.num_epochs is not None and state.epoch >= plan.num_epochs:
            state.finished = True
        self._control_point(end_of_epoch=True)

    def _epoch_batches(self) -> Iterator[Any]:
        """This epoch's micro-batches, starting at the saved cursor (exact mid-epoch resume)."""
        sampler: Any = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.state.epoch)
        skip = self.state.batch_in_epoch
        if skip and hasattr(sampler, "set_start"):
            sampler.set_start(skip * self.plan.batch_size)
            skip = 0
        iterator = iter(self.train_loader)
        for _ in range(skip):  # loaders without a resumable sampler: replay the order
            next(iterator)
        return iterator

    # ----------------------------------------------------------------------------- one step
    def _run_step(self, batches: Iterator[Any]) -> None:
        state, plan = self.state, self.plan
        self.fire(Event.STEP_START)
        micro = self._take(batches, plan.accumulation)
        counts = [self.task.count_targets(b) for b in micro]
        global_count = self.sums.host(float(sum(counts)))
        if global_count <= 0:
            raise DataError(f"step {state.global_step}: the batches hold no targets to train on")
        # Weight each micro-batch by its share of the step's targets over all ranks; DDP then
        # averages over ranks, so the update equals one large batch of every target.
        scale = self.sums.world_size / global_count
        # The strategy runs the micro-batches (one by one, or a pipeline schedule all at once).
        work = _StepWork(self, micro, counts, scale)
        loss_sum = self.strategy.forward_backward(self.model, work)
        state.step_stats = work.stats
        # The loss stays on the device (read only when someone looks); whether any rank got
        # SIGTERM/SIGINT is summed on the host, so every rank agrees to stop at the end of this
        # very step without waiting for the device.
        state.last_loss = self.sums.device(loss_sum) / global_count
        self._optimizer_step(state.last_loss)
        state.global_step += 1
        state.tokens_seen += int(global_count)
        self.guard.observe(state.global_step, state.last_loss, state.grad_norm)
        self.exit_requested = self.exit_requested or self._exit_agreed()
        state.lr = float(self.optimizer.param_groups[0]["lr"])
        self.fire(Event.STEP_END)

    def _take(self, batches: Iterator[Any], n: int) -> list[Any]:
        try:
            return [next(batches) for _ in range(n)]
        except StopIteration:
            raise DataError(
                f"the training loader ran out of batches at epoch {self.state.epoch}, micro-batch "
                f"{self.state.batch_in_epoch}: its length changed during the epoch"
            ) from None

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.scaler.unscale_(self.optimizer)
        norm = None
        if self.plan.max_grad_norm is not None:
            norm = self.strategy.clip_grad_norm_(self.model, self.plan.max_grad_norm)
            self.state.grad_norm = norm
        if self.guard.skip_update(self.state, loss, norm):
            self.scaler.update()  # a skipped step is still a step of the scaler's bookkeeping
        else:
            self.fire(Event.BEFORE_OPTIMIZER_STEP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.fire(Event.AFTER_OPTIMIZER_STEP)
        self.optimizer.zero_grad(set_to_none=True)
        self.bundle.lr_scheduler.step()  # the schedule follows the step count, skipped or not

    def _exit_agreed(self) -> bool:
        """Whether any rank received SIGTERM/SIGINT (one tiny host collective when
        distributed, over every rank: tensor-parallel ranks must stop together too)."""
        return self.sums.any_rank(self._local_exit)

    def _save(self, reason: str) -> None:
        self.guard.check(self.model, before=f"checkpoint of step {self.state.global_step}")
        self.checkpoints.save(self.state, reason, on_saved=lambda: self.fire(Event.CHECKPOINT_SAVE))

    # ----------------------------------------------------------------------------- control
    def _control_point(self, *, end_of_epoch: bool) -> None:
        state, plan, control = self.state, self.plan, self.control
        step = state.global_step
        self.checkpoints.poll()  # an async checkpoint committed since: checkpoint_save fires now
        if end_of_epoch and not self.exit_requested and self._exit_agreed():
            self.exit_requested = True
        if not end_of_epoch and step >= plan.total_steps:
            state.finished = True
        due_eval = (
            plan.eval_interval is not None and step % plan.eval_interval == 0 and not end_of_epoch
        ) or (plan.eval_interval is None and end_of_epoch)
        if (due_eval or control.should_evaluate) and not state.finished:
            control.should_evaluate = False
            self.evaluate()
        due_save = not end_of_epoch and self.checkpoints.due(step)
        if (due_save or control.should_save or self.exit_requested) and not state.finished:
            control.should_save = False
            self._save("exit" if self.exit_requested else "interval")
        self._honour_stop()

    def _honour_stop(self) -> None:
        state, control = self.state, self.control
        if control.should_stop and not state.finished:
            reason = control.stop_reason or "requested"
            log.info("stopping at step %d: %s", state.global_step, reason)
            state.stop_reason = control.stop_reason or "stop requested by a callback"
            state.finished = True

    def _track_best(self, metrics: dict[str, float]) -> None:
        """Keep ``best_<monitor>`` and ``best_<monitor>_step`` in the metrics (``eval.monitor``,
        ``eval.mode``); saved with every checkpoint, so a resumed run knows its best."""
        name = self.plan.monitor
        value = metrics.get(name)
        if value is None or not math.isfinite(value):
            return
        key = f"best_{name}"
        best = self.state.metrics.get(key)
        if best is None or (value < best if self.plan.mode == "min" else value > best):
            self.state.metrics[key] = value
            self.state.metrics[f"{key}_step"] = float(self.state.global_step)

    def _stop_evaluating(self) -> bool:
        """Whether an exit request (on any rank) abandons the evaluation in progress."""
        self.exit_requested = self.exit_requested or self._exit_agreed()
        return self.exit_requested

    def evaluate(self) -> dict[str, float] | None:
        """Run validation now, firing eval events; returns the new metrics, or None when an
        exit request abandoned it (no eval_end then; a resumed run evaluates again)."""
        if self.evaluator is None:
            return {}
        self.guard.check(self.model, before=f"evaluation at step {self.state.global_step}")
        self.fire(Event.EVAL_START)
        metrics = self.evaluator.evaluate(stop=self._stop_evaluating)
        if metrics is None:
            self.state.pending_eval = True
            return None
        self.state.pending_eval = False
        self.state.metrics.update(metrics)
        self._track_best(metrics)
        self._last_eval_step = self.state.global_step
        report = getattr(self.bundle.lr_scheduler, "report", None)
        if report is not None and "val_loss" in metrics:
            report(metrics["val_loss"])
        self.fire(Event.EVAL_END)
        return metrics
