"""The events of the training loop.

The loop, as pseudocode (``fire(e)`` calls ``on_<e>`` of every callback; events ending in
``_end`` and starting with ``after_`` run callbacks in reverse registration order)::

    fire(TRAIN_START)
    [evaluate: fire(EVAL_START) ... fire(EVAL_END)]          # eval.at_start
    while not finished:
        fire(EPOCH_START)
        for each optimizer step in the epoch:
            fire(STEP_START)
            for each micro-batch of the step (gradient accumulation):
                fire(BATCH_START)
                forward
                fire(BEFORE_BACKWARD); backward; fire(AFTER_BACKWARD)
                fire(BATCH_END)
            unscale + clip gradients
            fire(BEFORE_OPTIMIZER_STEP); optimizer.step(); fire(AFTER_OPTIMIZER_STEP)
            lr_scheduler.step()
            fire(STEP_END)
            <control point: eval (interval or requested), save (interval or requested), stop>
        fire(EPOCH_END)
        <control point: eval at epoch end when eval.interval is unset, save, stop>
    fire(TRAIN_END)

``CHECKPOINT_SAVE`` fires after a checkpoint is committed (with ``async_save``: at the first
control point after the background commit finished, on each rank by itself, and always before
``TRAIN_END`` for the final save), ``CHECKPOINT_LOAD`` after a run resumed from one (before
``TRAIN_START``), and ``EXCEPTION`` when the loop is left by an exception.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["REVERSED_EVENTS", "Event"]


class Event(str, Enum):
    """One point in the training loop where callbacks run (see the module docstring)."""

    TRAIN_START = "train_start"
    TRAIN_END = "train_end"
    EPOCH_START = "epoch_start"
    EPOCH_END = "epoch_end"
    STEP_START = "step_start"
    STEP_END = "step_end"
    BATCH_START = "batch_start"
    BATCH_END = "batch_end"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"
    EVAL_START = "eval_start"
    EVAL_END = "eval_end"
    CHECKPOINT_SAVE = "checkpoint_save"
    CHECKPOINT_LOAD = "checkpoint_load"
    EXCEPTION = "exception"

    @property
    def method_name(self) -> str:
        """The callback method that handles this event (``on_<value>``)."""
        return f"on_{self.value}"


#: Events whose callbacks run last-registered first, so setup/teardown pairs nest.
REVERSED_EVENTS = frozenset(
    e for e in Event if e.value.endswith("_end") or e.value.startswith("after_")
)
