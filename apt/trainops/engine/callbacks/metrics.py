"""``MetricsLogger``: what a run reports to its metric loggers, and when.

Every ``log_interval`` optimizer steps (all ranks take part; rank 0 sends):

==========================  ================================================================
``train_loss``              the step's mean loss over every rank and micro-batch
``lr``, ``grad_norm``       after the step; the norm before clipping
``tokens_seen``, ``epoch``  target tokens trained on, summed over ranks
``step_time``               seconds per optimizer step over the interval, slowest rank
``tokens_per_second``       tokens of the interval's steps / their time: a recent rate, not
                            a run average (evaluations and saves between steps don't count)
``mfu``                     model FLOPs utilization, when the device's peak is known
``peak_memory_gib``         peak device memory (CUDA: allocated; CPU: the process's max RSS),
                            largest over ranks
``train_<stat>``            the step's statistics from the task (``StepOutput.stats``), each
                            its mean over the step's targets on every rank, as ``train_loss``:
                            an APT model with auxiliary losses logs ``train_lm_loss`` and
                            ``train_moe_balance``, ``train_moe_z``, ``train_align_kl`` (their
                            sum is ``train_loss``), and ``train_moe_overflow_fraction``
==========================  ================================================================

After every evaluation: the ``val_*`` metrics and ``best_<monitor>``/``best_<monitor>_step``.
After every committed checkpoint: ``checkpoint_save_seconds`` (the whole save) and
``checkpoint_blocked_seconds`` (how long training waited for it).
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable

import torch

from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.engine.state import Control, RunState

__all__ = ["MetricSink", "MetricsLogger", "peak_memory_gib"]

log = logging.getLogger("apt")

#: Receives ``(metrics, step)``: the Trainer passes its monitor (metrics.jsonl, TensorBoard, ...).
MetricSink = Callable[[dict[str, float], int], None]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far, in GiB: CUDA memory allocated on ``device``, or the
    maximum resident set size of the process on other devices."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsLogger(Callback):
    """Sends training metrics every ``log_interval`` steps, and every evaluation and
    checkpoint, to the sink (rank 0); the module docstring lists the names.

    Args:
        log_interval: optimizer steps between two reports.
        sink: where the metrics go (``(metrics, step)``); None: nowhere.
        flops_per_token: training FLOPs per token of the model (6N + attention), for ``mfu``.
        peak_flops: peak FLOP/s of one device, for ``mfu`` (None: no ``mfu``).
        world_size: devices the run trains on (the peak is per device).
        reduce_max: the largest of a number over ranks (None: one process); called on every
            rank at the same steps.
        reduce_sum: the sum of a number over the data-parallel ranks (None: one process), for
            the step's statistics; called on every rank at the same steps, in name order.
        device: where peak memory is read.
    """

    def __init__(
        self,
        log_interval: int = 10,
        *,
        sink: MetricSink | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        world_size: int = 1,
        reduce_max: Callable[[float], float] | None = None,
        reduce_sum: Callable[[float], float] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.log_interval = log_interval
        self.sink = sink
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.reduce_max = reduce_max
        self.reduce_sum = reduce_sum
        self.device = torch.device(device)
        self._step_started = 0.0
        self._tokens_at_start = 0
        self._busy_seconds = 0.0
        self._busy_tokens = 0
        self._busy_steps = 0

    def on_step_start(self, state: RunState, control: Control) -> None:
        self._step_started, self._tokens_at_start = time.perf_counter(), state.tokens_seen

    def on_step_end(self, state: RunState, control: Control) -> None:
        self._busy_seconds += time.perf_counter() - self._step_started
        self._busy_tokens += state.tokens_seen - self._tokens_at_start
        self._busy_steps += 1
        if state.global_step % self.log_interval:
            return
        seconds, memory = self._busy_seconds, peak_memory_gib(self.device)
        if self.reduce_max is not None:  # every rank: the slowest step time, the largest peak
            seconds, memory = self.reduce_max(seconds), self.reduce_max(memory)
        tokens_per_second = self._busy_tokens / max(seconds, 1e-9)
        metrics = {
            "train_loss": state.last_loss,
            "lr": state.lr,
            "grad_norm": state.grad_norm,
            "tokens_seen": float(state.tokens_seen),
            "epoch": float(state.epoch),
            "step_time": seconds / max(self._busy_steps, 1),
            "tokens_per_second": tokens_per_second,
            "peak_memory_gib": memory,
        }
        for name, share in sorted(state.step_stats.items()):
            metrics[f"train_{name}"] = share if self.reduce_sum is None else self.reduce_sum(share)
        if self.flops_per_token and self.peak_flops:
            achieved = tokens_per_second * self.flops_per_token
            metrics["mfu"] = achieved / (self.peak_flops * self.world_size)
        self._busy_seconds, self._busy_tokens, self._busy_steps = 0.0, 0, 0
        self._emit(metrics, state.global_step, state)

    def on_eval_end(self, state: RunState, control: Control) -> None:
        evals = {
            k: v
            for k, v in state.metrics.items()
            if k.startswith(("val_", "best_")) and not k.endswith(("_initial", "_final"))
        }
        self._emit(evals, state.global_step, state)
        if state.is_main:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(evals.items()))
            log.info("step %d: %s", state.global_step, shown)

    def on_checkpoint_save(self, state: RunState, control: Control) -> None:
        saved = state.last_save
        if saved:
            timings = {
                "checkpoint_save_seconds": saved["total_seconds"],
                "checkpoint_blocked_seconds": saved["blocking_seconds"],
            }
            self._emit(timings, state.global_step, state)

    def _emit(self, metrics: dict[str, float], step: int, state: RunState) -> None:
        if self.sink is not None and state.is_main and metrics:
            self.sink(metrics, step)
