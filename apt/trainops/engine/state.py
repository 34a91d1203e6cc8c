"""Run state: the loop's mutable counters, a read-only view for callbacks, and ``Control``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apt.trainops.engine.bundle import TrainingBundle

__all__ = ["Control", "RunState", "TrainState"]


@dataclass
class TrainState:
    """What the loop counts. Saved in every checkpoint (JSON), so a resume continues exactly.

    Attributes:
        epoch: current epoch, from 0.
        global_step: optimizer updates done.
        batch_in_epoch: micro-batches consumed in the current epoch (the data cursor).
        micro_batch: micro-batches consumed in the whole run.
        tokens_seen: target tokens trained on, summed over ranks.
        last_loss: mean loss of the latest optimizer step.
        batch_loss: mean loss of the latest micro-batch on this rank (not reduced over ranks;
            not saved: it is only meaningful between ``batch_end`` and the next batch).
        last_save: timings of the latest committed checkpoint (``step``,
            ``total_seconds``, ``blocking_seconds``, ``bytes``); not saved.
        lr: learning rate of the first parameter group after the latest step.
        grad_norm: gradient norm before clipping of the latest step.
        metrics: the latest value of every metric (train_loss, val_loss, ...).
        finished: training reached its end (max_steps / num_epochs / stop request).
        stop_reason: why a callback stopped the run early ("" when it ran its course).
        pending_eval: an exit request abandoned the evaluation due at this step; a resumed
            run evaluates first, so it sees what an uninterrupted run saw.
        skipped_steps: updates skipped for a non-finite loss (``on_nonfinite: skip_step``).
        nonfinite_streak: non-finite steps in a row, up to the latest one.
        step_stats: this rank's share of the latest step's statistics (the task's
            ``StepOutput.stats``, each micro-batch's weighted by its targets over the step's
            targets on every rank, so the shares of the data-parallel ranks sum to the step's
            mean); 0-d tensors, read when someone looks; not saved.
    """

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    micro_batch: int = 0
    tokens_seen: int = 0
    # The loss and norm may be 0-d tensors: read through float() only when someone looks, so
    # the loop itself never waits for the device.
    last_loss: Any = float("nan")
    batch_loss: Any = float("nan")
    last_save: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    grad_norm: Any = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    stop_reason: str = ""
    pending_eval: bool = False
    skipped_steps: int = 0
    nonfinite_streak: int = 0
    step_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible copy."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "batch_in_epoch": self.batch_in_epoch,
            "micro_batch": self.micro_batch,
            "tokens_seen": self.tokens_seen,
            "last_loss": float(self.last_loss),
            "lr": self.lr,
            "grad_norm": float(self.grad_norm),
            "metrics": dict(self.metrics),
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "pending_eval": self.pending_eval,
            "skipped_steps": self.skipped_steps,
            "nonfinite_streak": self.nonfinite_streak,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "metrics": dict(data.get("metrics", {}))})


class RunState:
    """A read-only view of the run handed to every callback.

    Fields cannot be reassigned (``state.global_step = 3`` raises ``AttributeError``); the
    bundle's parts (model, optimizer, LR scheduler, ...) are the live objects, so a callback can
    act on them.
    """

    __slots__ = ("_bundle", "_env", "_train")
    _train: TrainState
    _bundle: TrainingBundle
    _env: tuple[int, int, int, int, int | None]

    def __init__(
        self,
        train: TrainState,
        bundle: TrainingBundle,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_steps: int = 0,
        steps_per_epoch: int = 0,
        num_epochs: int | None = None,
    ) -> None:
        object.__setattr__(self, "_train", train)
        object.__setattr__(self, "_bundle", bundle)
        object.__setattr__(self, "_env", (rank, world_size, max_steps, steps_per_epoch, num_epochs))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RunState is read-only: cannot set {name!r}; use Control to ask")

    epoch = property(lambda self: self._train.epoch, doc="Current epoch, from 0.")
    global_step = property(lambda self: self._train.global_step, doc="Optimizer updates done.")
    batch_in_epoch = property(
        lambda self: self._train.batch_in_epoch, doc="Micro-batches consumed in this epoch."
    )
    micro_batch = property(lambda self: self._train.micro_batch, doc="Micro-batches in the run.")
    tokens_seen = property(lambda self: self._train.tokens_seen, doc="Target tokens trained on.")
    last_loss = property(lambda self: float(self._train.last_loss), doc="Loss of the latest step.")
    batch_loss = property(
        lambda self: float(self._train.batch_loss),
        doc="Loss of the latest micro-batch on this rank (read it at batch_end).",
    )
    last_save = property(
        lambda self: dict(self._train.last_save),
        doc="Timings of the latest committed checkpoint (read it at checkpoint_save).",
    )
    lr = property(lambda self: self._train.lr, doc="Learning rate after the latest step.")
    grad_norm = property(
        lambda self: float(self._train.grad_norm), doc="Latest pre-clip grad norm."
    )
    metrics = property(lambda self: dict(self._train.metrics), doc="Latest metric values (copy).")
    step_stats = property(
        lambda self: {k: float(v) for k, v in self._train.step_stats.items()},
        doc="This rank's share of the latest step's statistics (the task's StepOutput.stats, "
        "weighted by targets over the step's targets on every rank): on one process their "
        "mean over the step; summed over the data-parallel ranks, the run's.",
    )
    bundle = property(lambda self: self._bundle, doc="Every stateful part of the run, by name.")
    model = property(lambda self: self._bundle.model, doc="The model being trained.")
    optimizer = property(lambda self: self._bundle.optimizer, doc="The optimizer.")
    lr_scheduler = property(lambda self: self._bundle.lr_scheduler, doc="The LR scheduler.")
    rank = property(lambda self: self._env[0], doc="This process's rank.")
    world_size = property(lambda self: self._env[1], doc="Number of processes.")
    max_steps = property(lambda self: self._env[2], doc="Total optimizer steps planned.")
    steps_per_epoch = property(lambda self: self._env[3], doc="Optimizer steps per epoch.")
    num_epochs = property(lambda self: self._env[4], doc="Epochs planned (None: by steps).")

    @property
    def is_main(self) -> bool:
        """True on rank 0, which logs and writes files."""
        return self._env[0] == 0


@dataclass
class Control:
    """Requests from callbacks to the loop; the loop decides when to honour them.

    Requests are honoured at the next control point: after ``step_end`` (eval, save, stop)
    and after ``epoch_end``. A request is cleared once honoured.
    """

    should_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    stop_reason: str = ""

    def request_stop(self, reason: str = "") -> None:
        """Finish training at the next control point (a final save and eval still happen)."""
        self.should_stop = True
        self.stop_reason = reason or self.stop_reason

    def request_save(self) -> None:
        """Write a checkpoint at the next control point."""
        self.should_save = True

    def request_eval(self) -> None:
        """Run validation at the next control point."""
        self.should_evaluate = True
