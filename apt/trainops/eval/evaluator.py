"""``Evaluator``: a task's validation step over a (sharded) set, summed exactly over ranks.

    evaluator = Evaluator(model=model, eval_dataset=val, metrics=["loss", "accuracy"])
    evaluator.evaluate()          # {"loss": 2.31, "accuracy": 0.41}

The Trainer builds one over its validation loader with ``prefix="val_"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from apt.core.errors import ConfigError
from apt.trainops.distributed import group_rank, group_world_size
from apt.trainops.engine.tasks import CausalLMTask, TrainingTask
from apt.trainops.eval.metrics import Reduce, check_metric_names, reduce_sums, summarize
from apt.trainops.eval.padding import PaddedForRanks, pad_collate

__all__ = ["Evaluator", "to_device"]


class Evaluator:
    """Runs a task's ``validation_step`` over the first ``max_batches`` of a set of batches.

    Give exactly one of ``eval_dataset`` (batched here: ``batch_size`` rows, unequal rows padded
    by :func:`~apt.trainops.eval.padding.pad_collate`, split over the ranks of a process group)
    or ``dataloader`` (yours, already sharded if you run several ranks).

    Args:
        model: the model (wrapped or not); switched to eval mode and back.
        eval_dataset: a map-style dataset of samples the task reads.
        dataloader: batches in a fixed order.
        task: the :class:`~apt.trainops.engine.tasks.TrainingTask` scoring batches (default:
            next-token prediction, :class:`~apt.trainops.engine.tasks.CausalLMTask`).
        metrics: names from :data:`~apt.trainops.eval.metrics.METRICS`, in the order wanted;
            None: every metric there is (loss, perplexity for a cross-entropy, bpb with
            ``token_bytes``, then each total the task reports, such as accuracy and entropy).
        batch_size: rows per batch of ``eval_dataset``.
        max_batches: batches per evaluation (None: all).
        device: where batches go (None: the device of the model's first parameter).
        autocast: a context-manager factory (mixed precision), or None.
        reduce: sums the packed totals over ranks; None: an all-reduce when torch.distributed
            is initialized, nothing otherwise. Pass ``lambda t: t`` to evaluate on one rank
            alone inside a process group.
        token_bytes: UTF-8 bytes of each token id
            (:func:`~apt.trainops.data.tokenizers.token_byte_lengths`), for ``bpb``; None: no
            bits per byte.
        prefix: put before every metric name (the Trainer: ``val_``).

    Raises:
        ConfigError: both or neither of ``eval_dataset`` and ``dataloader``; an unknown metric
            (with the valid names); ``perplexity`` for a task whose loss is no cross-entropy;
            ``bpb`` without ``token_bytes``, or ``token_bytes`` for a task that cannot count
            target bytes.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        eval_dataset: Dataset[Any] | None = None,
        dataloader: Iterable[Any] | None = None,
        task: TrainingTask | None = None,
        metrics: Sequence[str] | None = None,
        batch_size: int = 8,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        reduce: Reduce | None = None,
        token_bytes: torch.Tensor | None = None,
        prefix: str = "",
    ) -> None:
        self.model = model
        self.task = task if task is not None else CausalLMTask()
        self.metrics = None if metrics is None else check_metric_names(metrics, where="Evaluator")
        if self.metrics is not None and "perplexity" in self.metrics:
            _check_cross_entropy(self.task)
        self.token_bytes = _token_table(token_bytes, self.task, self.metrics)
        self.dataloader = _batches(eval_dataset, dataloader, self.task, batch_size)
        self.max_batches = max_batches
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.autocast = autocast or contextlib.nullcontext
        self.reduce = reduce
        self.prefix = prefix
        self.criterion = self.task.build_criterion()

    @torch.no_grad()
    def evaluate(self, stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
        """The metrics, averaged over every target of the batches seen on all ranks (empty when
        no batch held a target).

        Args:
            stop: asked before every batch (on every rank alike); when it says True the
                evaluation is abandoned and None comes back (an exit request).

        Raises:
            ConfigError: a metric asked for that the task reports no total for.
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
                self._score(batch, sums)
        finally:
            self.model.train(was_training)
        if not sums:
            return {}
        totals = reduce_sums(sums, device=self.device, reduce=self.reduce)
        return summarize(
            totals, self.metrics, perplexity=self.task.loss_is_cross_entropy, prefix=self.prefix
        )

    def _score(self, batch: Any, sums: dict[str, torch.Tensor]) -> None:
        """Add one batch's loss sum, target count, target bytes and task totals to ``sums``."""
        n = self.task.count_targets(batch)  # on the CPU batch: no device sync
        if self.token_bytes is not None:
            size = self.task.count_target_bytes(batch, self.token_bytes)  # type: ignore[attr-defined]
            _add(sums, "bytes", torch.tensor(float(size), dtype=torch.float64))
        batch = to_device(batch, self.device)
        with self.autocast():
            out = self.task.validation_step(self.model, batch, self.criterion)
        # A batch of padding only has no targets (and a NaN mean): it adds nothing.
        loss = out.loss.detach().double() * n if n else torch.zeros((), dtype=torch.float64)
        _add(sums, "loss", loss)
        _add(sums, "targets", torch.tensor(float(n), dtype=torch.float64))
        for name, total in out.totals.items():
            _add(sums, name, total.detach().double())


def _check_cross_entropy(task: TrainingTask) -> None:
    if not task.loss_is_cross_entropy:
        raise ConfigError(
            f"Evaluator: metric 'perplexity' needs a cross-entropy loss; the {task.name or 'given'}"
            " task's loss is not one. Drop 'perplexity' from metrics."
        )


def _token_table(
    token_bytes: torch.Tensor | None, task: TrainingTask, metrics: Sequence[str] | None
) -> torch.Tensor | None:
    """``token_bytes`` as a CPU int64 table (None: no bpb), once ``bpb`` is known to be
    computable: a table is given when bpb is asked for, and the task can count target bytes."""
    if token_bytes is None:
        if metrics is not None and "bpb" in metrics:
            raise ConfigError(
                "Evaluator: metric 'bpb' needs token_bytes=token_byte_lengths(tokenizer) "
                "(apt.trainops.data.tokenizers): the UTF-8 bytes each token id stands for"
            )
        return None
    if not callable(getattr(task, "count_target_bytes", None)):
        raise ConfigError(
            f"Evaluator: token_bytes (bits per byte) needs a task that counts the bytes of its "
            f"targets (count_target_bytes, as causal_lm has); {type(task).__name__} does not"
        )
    if token_bytes.ndim != 1:
        raise ConfigError(
            f"Evaluator: token_bytes must be 1-D (one entry per token id), got shape "
            f"{tuple(token_bytes.shape)}"
        )
    return token_bytes.detach().to("cpu", torch.int64)


def _batches(
    eval_dataset: Dataset[Any] | None,
    dataloader: Iterable[Any] | None,
    task: TrainingTask,
    batch_size: int,
) -> Iterable[Any]:
    """The dataloader given, or one over this rank's share of ``eval_dataset``.

    Raises:
        ConfigError: both or neither given; a dataset that cannot be split evenly over the
            ranks (no length, or a task that cannot pad it with target-free samples).
    """
    if (eval_dataset is None) == (dataloader is None):
        given = "both" if eval_dataset is not None else "neither"
        raise ConfigError(
            f"Evaluator: give exactly one of eval_dataset= (batched here) or dataloader= "
            f"(yours); {given} was given"
        )
    if dataloader is not None:
        return dataloader
    assert eval_dataset is not None
    if not isinstance(eval_dataset, Sized):
        raise ConfigError(
            "Evaluator: eval_dataset needs a length (a map-style dataset); pass an iterable "
            "dataset as dataloader=DataLoader(dataset, batch_size=...)"
        )
    from apt.trainops.data import create_dataloader

    rank, world = group_rank(), group_world_size()
    if world > 1 and len(eval_dataset) % world:
        if not task.can_pad:
            raise ConfigError(
                f"Evaluator: {len(eval_dataset)} samples do not split evenly over {world} ranks "
                f"and the {task.name or type(task).__name__} task cannot pad them; give "
                "dataloader= with your own sharding"
            )
        eval_dataset = PaddedForRanks(eval_dataset, world, task.without_targets)
    return create_dataloader(
        eval_dataset,
        batch_size=batch_size,
        num_workers=0,
        shuffle=False,
        rank=rank,
        world_size=world,
        drop_last=False,
        collate_fn=pad_collate,
    )


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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
