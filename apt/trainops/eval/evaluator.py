"""Validation loss, perplexity and accuracy over a (sharded) validation loader."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Evaluator", "compute_metrics", "to_device"]


def compute_metrics(
    loss_sum: float,
    targets: int,
    totals: dict[str, float] | None = None,
    *,
    perplexity: bool = True,
) -> dict[str, float]:
    """``val_loss``, ``val_perplexity`` (cross-entropy losses) and ``val_<name>`` = total/targets
    for each additive total (``accuracy``, ``entropy``, ...)."""
    if targets == 0:
        return {}
    loss = loss_sum / targets
    metrics = {"val_loss": loss}
    if perplexity:
        metrics["val_perplexity"] = math.exp(min(loss, 50.0))
    for name, total in (totals or {}).items():
        metrics[f"val_{name}"] = total / targets
    return metrics


class Evaluator:
    """Runs a task's ``validation_step`` over the first ``max_batches`` of a loader.

    Args:
        model: the model (wrapped or not); switched to eval mode and back.
        dataloader: the validation loader (deterministic order).
        task: the :class:`~apt.trainops.engine.tasks.TrainingTask` scoring batches.
        max_batches: batches per evaluation (None: all).
        device: where batches go.
        autocast: a context-manager factory (mixed precision), or None.
        reduce: sums ``[loss_sum, targets]`` over ranks (None in a single process).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        dataloader: Iterable[Any],
        task: Any,
        max_batches: int | None = None,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.dataloader = dataloader
        self.task = task
        self.max_batches = max_batches
        self.device = torch.device(device)
        self.autocast = autocast or contextlib.nullcontext
        self.reduce = reduce
        self.criterion = task.build_criterion()

    @torch.no_grad()
    def evaluate(self, stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
        """``val_loss`` (and ``val_perplexity``, ``val_<total>`` for the task's totals such as
        accuracy and entropy), averaged over every target of the batches seen on all ranks.

        Args:
            stop: asked before every batch (on every rank alike); when it says True the
                evaluation is abandoned and None comes back (an exit request).
        """
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        try:
            for i, batch in enumerate(self.dataloader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                if stop is not None and stop():
                    return None
                n = self.task.count_targets(batch)
                batch = to_device(batch, self.device)
                with self.autocast():
                    out = self.task.validation_step(self.model, batch, self.criterion)
                # A batch of padding only has no targets (and a NaN mean): it adds nothing.
                loss = out.loss.detach().double() * n if n else torch.zeros((), dtype=torch.float64)
                _add(sums, "loss", loss)
                _add(sums, "targets", torch.tensor(float(n), dtype=torch.float64))
                for name, total in out.totals.items():
                    _add(sums, name, total.detach().double())
        finally:
            self.model.train(was_training)
        if not sums:
            return {}
        names = sorted(sums)
        packed = torch.stack([sums[k] for k in names]).to(self.device)  # one collective for all
        if self.reduce is not None:
            packed = self.reduce(packed)
        values = dict(zip(names, packed.tolist(), strict=True))
        loss_sum, targets = values.pop("loss"), int(values.pop("targets"))
        return compute_metrics(
            loss_sum, targets, values, perplexity=getattr(self.task, "loss_is_cross_entropy", False)
        )


def _add(sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    value = value.cpu()
    sums[name] = sums[name] + value if name in sums else value


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (tensor, dict, list or tuple) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
