"""``training.on_nonfinite``: what the loop does when the loss, gradients or weights stop being
finite.

``stop`` (the default) watches every step without waiting for the device: the step and loss of
the first non-finite step are kept on the device and read late (on CUDA through a pinned copy
looked at once it has landed, usually a step or two later; on the CPU one step late), and in
full before every checkpoint and evaluation, together with a
check of the weights. So no checkpoint of a diverged model is ever written: the newest good one
stays LATEST. ``skip_step`` reads the loss of every step before its update (one host sync per
step) and skips the update of a non-finite one. ``continue`` checks nothing.

The gradient norm counts only when gradients are clipped (that is when it is computed) and no
fp16 GradScaler runs: the scaler expects the occasional overflow and skips those steps itself.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import nn

from apt.core.errors import TrainingDiverged
from apt.trainops.distributed import RankSums
from apt.trainops.engine.state import TrainState

__all__ = ["NonFiniteGuard", "Policy"]

log = logging.getLogger("apt")

Policy = Literal["stop", "skip_step", "continue"]

_FIXES = (
    "lower training.learning_rate, clip gradients (training.max_grad_norm), or set "
    "training.on_nonfinite: skip_step; then run the same command to resume from the newest "
    "checkpoint"
)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) parameter."""
    to_local = getattr(t, "to_local", None)  # DTensor (FSDP2)
    return to_local() if callable(to_local) else t


def nonfinite_weights(model: nn.Module, sums: RankSums) -> list[str]:
    """Names of the parameters holding NaN or inf (on any rank; collective when distributed)."""
    named = [(name, _local(p.detach())) for name, p in model.named_parameters()]
    flags = [~torch.isfinite(t).all() for _, t in named if t.numel()]
    if not flags:
        return []
    local = torch.stack(flags).float()
    everywhere = sums.device(local)  # one collective, one host read
    sized = [name for name, t in named if t.numel()]
    return [name for name, bad in zip(sized, everywhere.tolist(), strict=True) if bad > 0]


class NonFiniteGuard:
    """Applies ``training.on_nonfinite`` to every optimizer step.

    Args:
        policy: stop, skip_step or continue.
        max_skipped_steps: skip_step fails when more steps than this in a row are non-finite.
        sums: sums over the data-parallel ranks (for the weight check).
        check_grad_norm: whether a non-finite gradient norm counts (False under an fp16
            GradScaler, which skips overflowing steps itself).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        max_skipped_steps: int,
        sums: RankSums,
        check_grad_norm: bool,
    ) -> None:
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.sums = sums
        self.check_grad_norm = check_grad_norm
        self._first_bad: tuple[torch.Tensor, torch.Tensor] | None = None  # (step, loss)
        self._previous: torch.Tensor | None = None  # CPU: the first bad step, one step late
        self._host: torch.Tensor | None = None  # CUDA: its pinned host copy ...
        self._landed: torch.cuda.Event | None = None  # ... and when that copy has landed

    def _bad(self, loss: torch.Tensor, grad_norm: torch.Tensor | float | None) -> torch.Tensor:
        bad = ~torch.isfinite(loss)
        if self.check_grad_norm and isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(grad_norm.to(loss.device))
        return bad

    # ------------------------------------------------------------------ skip_step
    def skip_update(
        self, state: TrainState, loss: torch.Tensor, grad_norm: torch.Tensor | float | None
    ) -> bool:
        """Whether this step's update is skipped (skip_step only; reads the loss).

        Raises:
            TrainingDiverged: more than ``max_skipped_steps`` non-finite steps in a row.
        """
        if self.policy != "skip_step":
            return False
        if not bool(self._bad(loss, grad_norm)):
            state.nonfinite_streak = 0
            return False
        step = state.global_step + 1
        state.nonfinite_streak += 1
        if state.nonfinite_streak > self.max_skipped_steps:
            raise TrainingDiverged(
                f"step {step}: the training loss is {float(loss)} for the "
                f"{state.nonfinite_streak}th step in a row (training.on_nonfinite: skip_step, "
                f"max_skipped_steps: {self.max_skipped_steps}); the weights are not learning "
                f"any more. {_FIXES[0].upper()}{_FIXES[1:]}."
            )
        state.skipped_steps += 1
        log.warning(
            "step %d: non-finite loss %s (gradient norm %s): update skipped "
            "(%d in a row, %d in this run; training.on_nonfinite: skip_step)",
            step,
            float(loss),
            float(grad_norm) if grad_norm is not None else "not computed",
            state.nonfinite_streak,
            state.skipped_steps,
        )
        return True

    # ------------------------------------------------------------------ stop
    def observe(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | float | None
    ) -> None:
        """Record ``step`` if it is the first non-finite one (on the device, no sync); raise
        when a step before it was non-finite (read late: no wait for the device).

        Raises:
            TrainingDiverged: under ``stop``, a step so far was non-finite.
        """
        if self.policy != "stop":
            return
        loss = loss.detach().float()
        bad = self._bad(loss, grad_norm)
        now = torch.full((), step, dtype=torch.int64, device=loss.device)
        if self._first_bad is None:
            self._first_bad = (torch.where(bad, now, -1), loss)
        else:
            first_step, first_loss = self._first_bad
            new = bad & (first_step < 0)
            first_step = torch.where(new, now, first_step)
            self._first_bad = (first_step, torch.where(new, loss, first_loss))
        if loss.is_cuda:
            self._read_when_landed(self._first_bad[0])
            return
        previous, self._previous = self._previous, self._first_bad[0]
        if previous is not None and int(previous) >= 0:
            self._raise()

    def _read_when_landed(self, first_step: torch.Tensor) -> None:
        """CUDA: copy the first bad step to pinned host memory without blocking, and look at
        the copy only once it has landed (an event query, no wait). ``int()`` of a device
        tensor would wait for every kernel queued so far, including this step's: the host
        could then never run ahead of the device."""
        if self._host is None:
            self._host = torch.empty((), dtype=torch.int64, pin_memory=True)
            self._landed = torch.cuda.Event()
        elif self._landed is not None and self._landed.query():
            if int(self._host) >= 0:
                self._raise()
        else:
            return  # the last copy is still on its way; the next step looks again
        assert self._landed is not None
        self._host.copy_(first_step, non_blocking=True)
        self._landed.record()

    def check(self, model: nn.Module, *, before: str) -> None:
        """Under ``stop``: raise when any step so far, or any weight, is non-finite (before a
        checkpoint or an evaluation; collective when distributed)."""
        if self.policy != "stop":
            return
        if self._first_bad is not None and int(self._first_bad[0]) >= 0:
            self._raise()
        names = nonfinite_weights(model, self.sums)
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise TrainingDiverged(
                f"before the {before}: {len(names)} weight tensor(s) hold NaN or inf ({shown}) "
                f"while every loss so far was finite (training.on_nonfinite: stop). Nothing was "
                f"saved from this state; {_FIXES}."
            )

    def _raise(self) -> None:
        assert self._first_bad is not None
        step, loss = int(self._first_bad[0]), float(self._first_bad[1])
        if math.isfinite(loss):
            what = f"the gradient norm is not finite (loss {loss:.4f})"
        else:
            what = f"the training loss is {loss}"
        raise TrainingDiverged(
            f"step {step}: {what} (training.on_nonfinite: stop). No checkpoint from step {step} "
            f"on was written; {_FIXES}."
        )
