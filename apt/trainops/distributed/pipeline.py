"""Pipeline stages: which blocks each stage runs, which rank holds it, and the module a rank
trains (:class:`PipelinedModel`).

The blocks split into ``pp x stages_per_rank`` contiguous stages; stage ``s`` lives on the
pipeline rank ``s % pp`` (the loop order torch's interleaved schedules expect), so with one
stage per rank rank ``p`` holds stage ``p``, and with two rank ``p`` holds stages ``p`` and
``p + pp``. A rank's pieces are the model's own modules, under the model's parameter names.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from apt.core.errors import ConfigError
from apt.model.architectures.output import ModelOutput

__all__ = ["PipelinedModel", "SequentialForward", "split_layers", "stage_owner"]

_SPLIT_KEY = "training.distributed.pipeline.split_points"


def split_layers(num_layers: int, stages: int, points: list[int] | None = None) -> list[range]:
    """The blocks of each of ``stages`` stages: at ``points`` (the first block of every stage
    but the first), or evenly.

    Raises:
        ConfigError: the layers do not split evenly (no ``points``), or ``points`` is not one
            increasing index per stage boundary inside ``1..num_layers - 1``.
    """
    if points is None:
        if num_layers % stages:
            raise ConfigError(
                f"model.num_layers {num_layers} does not split evenly over {stages} pipeline "
                f"stages (pp x stages_per_rank); change training.distributed.pp, or give the "
                f"first block of each stage after the first in {_SPLIT_KEY}"
            )
        size = num_layers // stages
        bounds = list(range(0, num_layers + 1, size))
    else:
        if len(points) != stages - 1 or points[-1] >= num_layers:
            raise ConfigError(
                f"{_SPLIT_KEY} {points}: {stages} stages of model.num_layers {num_layers} need "
                f"{stages - 1} increasing block indices between 1 and {num_layers - 1}, e.g. "
                f"{[round(num_layers * (i + 1) / stages) for i in range(stages - 1)]}"
            )
        bounds = [0, *points, num_layers]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def stage_owner(stage: int, pp: int) -> int:
    """The pipeline rank that holds ``stage``."""
    return stage % pp


class SequentialForward:
    """A forward through every stage in turn, for evaluation: the hidden states travel from
    rank to rank, and the last stage's logits (B, T, V) are broadcast to every pipeline rank.

    No micro-batches and no overlap: evaluation only, where the batch is small and the
    gradients none. Collective over the pipeline ranks.

    Args:
        stages: this rank's stage modules by stage index.
        ranks: the global ranks of this pipeline, in pipeline order.
        pp_rank: this rank's place in ``ranks``.
        num_stages: stages of the whole pipeline.
        hidden_size, vocab_size: D and V of the messages.
        group: the pipeline's process group.
    """

    def __init__(
        self,
        stages: dict[int, nn.Module],
        *,
        ranks: list[int],
        pp_rank: int,
        num_stages: int,
        hidden_size: int,
        vocab_size: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.stages, self.ranks, self.pp_rank = stages, ranks, pp_rank
        self.num_stages, self.group = num_stages, group
        self.hidden_size, self.vocab_size = hidden_size, vocab_size

    def _rank_of(self, stage: int) -> int:
        return self.ranks[stage_owner(stage, len(self.ranks))]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        B, T = input_ids.shape
        me = self.ranks[self.pp_rank]
        x: torch.Tensor = input_ids
        for s in range(self.num_stages):
            if s not in self.stages:
                continue
            if s > 0 and self._rank_of(s - 1) != me:
                x = torch.empty(B, T, self.hidden_size, device=input_ids.device)
                dist.recv(x, src=self._rank_of(s - 1), group=self.group)
            x = self.stages[s](x).float()  # (B, T, D), or (B, T, V) at the last stage
            if s < self.num_stages - 1 and self._rank_of(s + 1) != me:
                dist.send(x.contiguous(), dst=self._rank_of(s + 1), group=self.group)
        last = self._rank_of(self.num_stages - 1)
        if me != last:
            x = torch.empty(B, T, self.vocab_size, device=input_ids.device)
        dist.broadcast(x, src=last, group=self.group)
        return x


class PipelinedModel(nn.Module):
    """The stages one rank holds, as one module with the whole model's parameter names.

    The optimizer, the checkpoints and the callbacks see this module. Training runs through
    the pipeline schedule (:meth:`PipelineStrategy.forward_backward`); calling the module
    runs :class:`SequentialForward` (evaluation) and returns what the whole model would: the
    logits on every pipeline rank, and the cross-entropy when ``targets`` are given.

    Args:
        stages: this rank's stage modules by stage index (each an
            :class:`~apt.model.architectures.stages.APTStage`).
        source: the whole model the stages come from (its other modules emptied): what an
            export writes the gathered weights with.
        forward: the evaluation forward over every pipeline rank.
    """

    stage_modules: dict[int, nn.Module]
    source: nn.Module
    _forward: SequentialForward

    def __init__(
        self, stages: dict[int, nn.Module], *, source: nn.Module, forward: SequentialForward
    ) -> None:
        super().__init__()
        for stage in stages.values():
            for name, child in stage.named_children():
                held = getattr(self, name, None)
                if isinstance(child, nn.ModuleDict):  # the blocks, by their global index
                    if held is None:
                        held = nn.ModuleDict()
                        setattr(self, name, held)
                    held.update(dict(child.items()))
                elif held is None:
                    setattr(self, name, child)
        # Plain attributes: their modules are registered above, once, under the model's names.
        self.__dict__["stage_modules"] = dict(stages)
        self.__dict__["source"] = source
        self.__dict__["_forward"] = forward

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        targets: torch.Tensor | None = None,  # (B, T)
        *,
        return_logits: bool = True,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """The whole model's forward, without gradients (evaluation). Collective.

        Raises:
            ConfigError: ``document_ids`` (they do not travel between the stages).
            RuntimeError: called with gradients on: training goes through the schedule.
        """
        if document_ids is not None:
            raise ConfigError(
                "strategy pipeline cannot keep the documents of packed rows apart; set "
                "data.document_mask: false (for sft: data.source.packing: false)"
            )
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a pipelined model trains through its schedule (Strategy.forward_backward); "
                "call it under torch.no_grad() to evaluate"
            )
        logits = self._forward(input_ids)  # (B, T, V), fp32
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
        kept = logits if return_logits or targets is None else None
        return ModelOutput(kept, loss, loss)
