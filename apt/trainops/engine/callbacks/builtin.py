"""Built-in callbacks: progress bar, LR and gradient-norm monitors, early stop (metric logging:
:mod:`.metrics`)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any, Literal

from apt.core.config import EvalConfig
from apt.trainops.engine.callbacks.base import Callback
from apt.trainops.engine.callbacks.metrics import MetricSink
from apt.trainops.engine.state import Control, RunState

__all__ = [
    "EarlyStopping",
    "GradientNormMonitor",
    "LRMonitor",
    "ProgressBar",
]

log = logging.getLogger("apt")


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps showing loss, lr and tokens/s (rank 0 only).

    ``tok_s`` is the rate of the last ``window`` steps, timed from each step's start to its
    end, so compilation, evaluation and checkpoint saves between steps do not dilute it once
    they are past. At the end one line gives that rate and the run's average.

    Args:
        refresh_every: update the numbers every this many steps.
        window: steps the shown rate is measured over.
    """

    def __init__(self, refresh_every: int = 1, window: int = 20) -> None:
        self.refresh_every = refresh_every
        self._bar: Any = None
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._t0 = 0.0
        self._tokens0 = 0
        self._step_start = 0.0
        self._step_tokens = 0

    def on_train_start(self, state: RunState, control: Control) -> None:
        if not state.is_main:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )
        self._t0, self._tokens0 = time.perf_counter(), state.tokens_seen
        self._recent.clear()

    def on_step_start(self, state: RunState, control: Control) -> None:
        if self._bar is not None:
            self._step_start, self._step_tokens = time.perf_counter(), state.tokens_seen

    def on_step_end(self, state: RunState, control: Control) -> None:
        if self._bar is None:
            return
        took = time.perf_counter() - self._step_start
        self._recent.append((state.tokens_seen - self._step_tokens, took))
        self._bar.update(state.global_step - self._bar.n)
        if state.global_step % self.refresh_every == 0:
            self._bar.set_postfix(
                loss=f"{state.last_loss:.4f}",
                lr=f"{state.lr:.2e}",
                tok_s=f"{self._recent_rate():,.0f}",
                refresh=False,
            )

    def _recent_rate(self) -> float:
        tokens = sum(t for t, _ in self._recent)
        return tokens / max(sum(s for _, s in self._recent), 1e-9)

    def on_train_end(self, state: RunState, control: Control) -> None:
        shown = self._bar is not None and self._recent
        self._close()
        if shown:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            log.info(
                "throughput: %s tokens/s over the last %d steps; %s tokens/s on average over "
                "this run's %.1f s (start-up, compilation and evaluations included)",
                f"{self._recent_rate():,.0f}",
                len(self._recent),
                f"{(state.tokens_seen - self._tokens0) / elapsed:,.0f}",
                elapsed,
            )

    def on_exception(self, state: RunState, control: Control) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LRMonitor(Callback):
    """Records the learning rate of every parameter group at every step (``lr/group_<i>``)."""

    def __init__(self, *, sink: MetricSink | None = None) -> None:
        self.sink = sink
        self.history: list[tuple[int, list[float]]] = []

    def on_step_end(self, state: RunState, control: Control) -> None:
        if state.optimizer is None:
            return
        lrs = [float(g["lr"]) for g in state.optimizer.param_groups]
        self.history.append((state.global_step, lrs))
        if self.sink is not None and state.is_main:
            self.sink({f"lr/group_{i}": lr for i, lr in enumerate(lrs)}, state.global_step)


class GradientNormMonitor(Callback):
    """Logs the pre-clip gradient norm; warns on a non-finite norm, optionally stops."""

    def __init__(self, stop_on_nonfinite: bool = False, *, sink: MetricSink | None = None) -> None:
        self.stop_on_nonfinite = stop_on_nonfinite
        self.sink = sink

    def on_step_end(self, state: RunState, control: Control) -> None:
        norm = state.grad_norm
        if self.sink is not None and state.is_main:
            self.sink({"grad_norm": norm}, state.global_step)
        if not math.isfinite(norm):
            log.warning("step %d: gradient norm is %s", state.global_step, norm)
            if self.stop_on_nonfinite:
                control.request_stop(f"non-finite gradient norm at step {state.global_step}")


class EarlyStopping(Callback):
    """Stops training when ``monitor`` has not improved by ``min_delta`` for ``patience`` evals.

    Args:
        monitor: metric name (``val_loss``, ``val_perplexity``, ...); None: ``eval.monitor``.
        mode: ``min`` (lower is better) or ``max``; None: ``eval.mode``.
        patience: evaluations without improvement tolerated.
        min_delta: smallest change that counts as an improvement.
        evaluation: the run's ``eval`` section (given by the Trainer to callbacks built from
            YAML): its ``monitor``/``mode`` are the defaults, else ``val_loss``/``min``.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        evaluation: EvalConfig | None = None,
    ) -> None:
        monitor = monitor or (evaluation.monitor if evaluation is not None else "val_loss")
        mode = mode or (evaluation.mode if evaluation is not None else "min")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_at_step: int | None = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_eval_end(self, state: RunState, control: Control) -> None:
        value = state.metrics.get(self.monitor)
        if value is None:
            return
        if self._improved(value):
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stopped_at_step = state.global_step
            control.request_stop(
                f"early stopping: {self.monitor} has not improved for {self.bad_evals} "
                f"evaluations (best {self.best:.4f})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "bad_evals": self.bad_evals,
            "stopped_at_step": self.stopped_at_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_evals = state["bad_evals"]
        self.stopped_at_step = state.get("stopped_at_step")
