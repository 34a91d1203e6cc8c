"""Test-only callback for the tensor-parallel runs (``--set 'callbacks=[{name:
tp_hooks:FirstGradients, path: ...}]'``, this folder on ``PYTHONPATH``).

:class:`FirstGradients` writes, after the first backward of a run, every parameter's whole
gradient (a split one gathered from the tp ranks; collective) to
``<path>.rank<r>.safetensors`` on every rank, before clipping and the optimizer touch them.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from apt.trainops.engine import Callback
from apt.trainops.engine.state import Control, RunState

__all__ = ["FirstGradients"]


class FirstGradients(Callback):
    """Dump the gradients of the run's first micro-batch (see the module docstring).

    Args:
        path: file name stem; each rank appends ``.rank<r>.safetensors``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.done = False

    def on_after_backward(self, state: RunState, control: Control) -> None:
        if self.done or state.global_step != 0:
            return
        self.done = True
        grads: dict[str, torch.Tensor] = {}
        for name, param in state.model.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            gather = getattr(grad, "full_tensor", None)  # DTensor: every rank takes part
            whole = gather() if callable(gather) else grad
            grads[name] = whole.detach().cpu().clone().contiguous()
        save_file(grads, f"{self.path}.rank{state.rank}.safetensors")
