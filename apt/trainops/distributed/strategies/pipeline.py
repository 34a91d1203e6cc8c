"""``pipeline``: the model's blocks split into stages over the ``pp`` ranks
(``torch.distributed.pipelining``).

Each rank holds its stages (:mod:`apt.trainops.distributed.pipeline`) and trains them through
a schedule (GPipe, 1F1B or interleaved 1F1B) that runs all micro-batches of a step at once:
the loop hands the step's micro-batches to :meth:`PipelineStrategy.forward_backward`, which
joins them, lets the schedule cut them into ``pipeline.microbatches`` pieces, and computes the
loss of each piece on the last stage as sum of token losses / targets of the step, so the
gradients are those of one process on the same global batch. An output head tied to the
embedding lives on the first and the last stage; its two gradients are summed after the
schedule, and both copies take the same optimizer step.

With ``dp_shard > 1`` (``strategy: pipeline`` with ``dp_shard``, or ``strategy: hybrid`` with
``pp``) every stage is sharded with FSDP2 over its ``dp_shard`` ranks, each block one unit as
under ``fsdp``: the ``pp`` groups of one data-parallel coordinate run the schedule on their
share of the batch, and the schedule reduce-scatters each stage's gradients after its last
micro-batch. Layout on 4 ranks (``pp: 2, dp_shard: 2``)::

    stage 0: ranks 0, 1 (FSDP group)      stage 1: ranks 2, 3 (FSDP group)
    pipelines (one data shard each): {0, 2}, {1, 3}
"""

from __future__ import annotations

import inspect
import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from apt.core.config.distributed import DistributedConfig
from apt.core.errors import ConfigError
from apt.model.architectures.apt_model import APTModel
from apt.model.architectures.stages import PIPELINE_LAYERS, APTStage, head_is_tied
from apt.trainops.distributed.dtensor import is_dtensor
from apt.trainops.distributed.env import DistEnv, in_process_group
from apt.trainops.distributed.pipeline import (
    PipelinedModel,
    SequentialForward,
    split_layers,
    stage_owner,
)
from apt.trainops.distributed.state_dicts import (
    StateDict,
    load_full_state,
    load_sharded_state,
    sharded_state,
)
from apt.trainops.distributed.strategies.base import MicroBatches, Strategy
from apt.trainops.distributed.strategies.fsdp import apply_fsdp, mixed_precision_policy

__all__ = ["PipelineStrategy"]

log = logging.getLogger(__name__)

_SCHEDULES: dict[str, Any] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}
_TIED = "embed_tokens.weight"  # the name a tied head's tensor keeps (stages.py)


class PipelineStrategy(Strategy):
    """Pipeline parallelism over the ``pp`` sub-mesh, ``training.distributed.pipeline``
    options. In a process without a process group the model is not split.

    Raises:
        ConfigError: ``training.precision`` fp16 (the schedule's backward bypasses the
            gradient scaler).
    """

    name = "pipeline"

    def __init__(self, cfg: DistributedConfig, *, env: DistEnv, **kwargs: Any) -> None:
        super().__init__(cfg, env=env, **kwargs)
        if self.precision == "fp16":
            raise ConfigError(
                "training.precision fp16 under training.distributed.strategy pipeline: the "
                "schedule backpropagates past the fp16 gradient scaler; use bf16 or fp32"
            )
        self.sharded = self.holds_part = in_process_group()
        self.num_stages = self.dims.pp * cfg.pipeline.local_stages
        self.pp_rank = self.dims.pp_rank(env.rank)
        self._ranks: list[int] = next(
            (r for r in self.dims.pp_groups() if env.rank in r), [env.rank]
        )
        self._stages: list[PipelineStage] = []
        self._schedule: Any = None
        self._microbatches = 0
        self._weight = 0.0  # of one token's loss in this step (the loss function reads it)
        self._tied: dist.ProcessGroup | None = None  # first and last stage's ranks
        self._tied_counted = True  # this rank's copy of a tied tensor counts in the norm
        self._group_names: dict[int, list[list[str]]] = {}  # optimizer id -> names per group

    # ------------------------------------------------------------------ building
    def apply(self, model: nn.Module) -> nn.Module:
        _check_model(model)
        assert isinstance(model, APTModel)
        if not self.sharded:
            log.warning("strategy pipeline in a single process without a process group: not split")
            return model.to(self.env.device)
        assert self.mesh is not None  # built by build_strategy inside a process group
        group = self.mesh["pp"].get_group()
        layers = split_layers(
            len(getattr(model, PIPELINE_LAYERS)), self.num_stages, self.cfg.pipeline.split_points
        )
        last = self.num_stages - 1
        tied = head_is_tied(model)  # asked before FSDP2 gives the first stage's copy its own
        mine = [s for s in range(self.num_stages) if stage_owner(s, self.dims.pp) == self.pp_rank]
        pieces: dict[int, nn.Module] = {
            s: APTStage(model, layers[s], first=s == 0, last=s == last) for s in mine
        }
        _empty_the_rest(model, pieces.values())
        for piece in pieces.values():
            piece.to(self.env.device)
            if self.dims.dp_shard > 1:
                assert isinstance(piece, APTStage)
                blocks = list(piece.blocks.values())
                mp = mixed_precision_policy(self.cfg.fsdp, self.precision)
                apply_fsdp(
                    piece, self.cfg.fsdp, dp_mesh=self.mesh["dp_shard"], mp=mp, blocks=blocks
                )
        if tied and self.dims.dp_shard > 1:
            # FSDP2 gave the embedding a sharded parameter; the whole model's head (outside
            # the first stage's piece) still held the old one. Tie it again, so that an
            # export of the whole model sees one tensor.
            model.lm_head.weight = model.embed_tokens.weight
        self._stages = [
            PipelineStage(piece, s, self.num_stages, self.env.device, group=group)
            for s, piece in pieces.items()
        ]
        if tied:
            self._tie(first=stage_owner(0, self.dims.pp), last=stage_owner(last, self.dims.pp))
        forward = SequentialForward(
            pieces,
            ranks=self._ranks,
            pp_rank=self.pp_rank,
            num_stages=self.num_stages,
            hidden_size=model.config.hidden_size,
            vocab_size=int(model.config.vocab_size),
            group=group,
        )
        if self.env.is_main:
            spans = ", ".join(f"{s}: blocks {r.start}-{r.stop - 1}" for s, r in enumerate(layers))
            inside = f", FSDP2 over dp_shard {self.dims.dp_shard}" if self.dims.dp_shard > 1 else ""
            log.info("pipeline stages %s (%s%s)", spans, self.cfg.pipeline.schedule, inside)
        return PipelinedModel(pieces, source=model, forward=forward)

    def _tie(self, *, first: int, last: int) -> None:
        """The group of the first and last stage's ranks of every pipeline (each rank makes
        every group: c10d's rule), over which the tied tensor's gradient is summed."""
        timeout = timedelta(seconds=self.cfg.timeout_seconds)
        for ranks in self.dims.pp_groups():
            pair = sorted({ranks[first], ranks[last]})
            group = dist.new_group(pair, timeout=timeout) if len(pair) > 1 else None
            if self.env.rank in pair and group is not None:
                self._tied = group
                # Counted once in the gradient norm: by the first stage's copy.
                self._tied_counted = self.env.rank == ranks[first]

    def compile(
        self, model: nn.Module, mode: str = "default", options: dict[str, Any] | None = None
    ) -> nn.Module:
        raise ConfigError(
            "training.compile under training.distributed.strategy pipeline is not supported "
            "yet: set training.compile: false"
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The whole model the stages come from (its other stages' modules empty): what an
        export writes the gathered weights with."""
        return model.source if isinstance(model, PipelinedModel) else super().unwrap(model)

    # ------------------------------------------------------------------ one step
    def forward_backward(self, model: nn.Module, step: MicroBatches) -> torch.Tensor:
        """All micro-batches of the step through the schedule.

        The loop's events differ from one micro-batch at a time: ``batch_start`` fires for
        every micro-batch first, then ``before_backward``, the schedule (every forward and
        backward), ``after_backward``, and ``batch_end`` for every micro-batch, each with its
        own loss (sent from the last stage to every rank).
        """
        if not self._stages:
            return super().forward_backward(model, step)
        inputs, targets = [], []
        for i in range(len(step.batches)):
            ids, labels = step.token_targets(step.begin(i))
            inputs.append(ids)
            targets.append(labels)
        schedule = self._schedule_for(rows=inputs[0].shape[0], batches=len(inputs))
        self._weight = step.scale
        losses: list[torch.Tensor] = []
        kwargs: dict[str, Any] = {"target": torch.cat(targets), "losses": losses}
        if "return_outputs" in inspect.signature(schedule.step).parameters:
            kwargs["return_outputs"] = False  # the last stage's logits are not kept
        with step.autocast(), step.backward_events():
            if self._stages[0].is_first:
                schedule.step(torch.cat(inputs), **kwargs)
            else:
                schedule.step(**kwargs)
            self._sum_tied_gradients(model)
        pieces = self._share_losses(losses)  # (microbatches,) sum of token losses x scale
        per_batch = pieces.view(len(inputs), -1).sum(dim=1) / step.scale  # token-loss sums
        for i, count in enumerate(step.counts):
            step.end(per_batch[i] / count)
        return pieces.sum() / step.scale

    def _schedule_for(self, *, rows: int, batches: int) -> Any:
        n = self.cfg.pipeline.resolve_microbatches(
            batch_size=rows, accumulation=batches, stages=self.num_stages
        )
        if self._schedule is None:
            cls = _SCHEDULES[self.cfg.pipeline.schedule]
            stages: Any = self._stages if cls is ScheduleInterleaved1F1B else self._stages[0]
            # The loss is already a sum over the step's tokens / their count: no scaling by
            # the number of micro-batches.
            self._schedule = cls(stages, n_microbatches=n, loss_fn=self._loss, scale_grads=False)
            self._microbatches = n
        elif n != self._microbatches:
            raise ConfigError(
                f"training.distributed.pipeline: a step of {batches} x {rows} sequences needs "
                f"{n} micro-batches, but the schedule was built for {self._microbatches}; "
                "every step must hold the same number of sequences (a loader with drop_last)"
            )
        return self._schedule

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch's loss on the last stage: its token losses' sum x the step's
        weight of one token (the mean over the step's targets, summed over micro-batches)."""
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return total * self._weight

    def _share_losses(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """The micro-batch losses of the last stage, on every pipeline rank."""
        pieces = torch.zeros(self._microbatches, device=self.env.device, dtype=torch.float32)
        if losses:
            pieces = torch.stack([loss.detach().float() for loss in losses])
        last = self._ranks[stage_owner(self.num_stages - 1, self.dims.pp)]
        dist.broadcast(pieces, src=last, group=self.mesh["pp"].get_group() if self.mesh else None)
        return pieces

    def _sum_tied_gradients(self, model: nn.Module) -> None:
        if self._tied is None:
            return
        grad = dict(model.named_parameters())[_TIED].grad
        if grad is not None:
            # Under FSDP both copies are sharded alike over their stage's dp_shard ranks, and
            # the pair shares the data-parallel coordinate: the local shards line up.
            local = grad.to_local() if is_dtensor(grad) else grad  # type: ignore[attr-defined]
            dist.all_reduce(local, group=self._tied)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The norm over every stage's gradients (a tied tensor counted once), reduced over
        the pipeline ranks, then the base contract's clipping."""
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        counted = [p.grad for n, p in named if n != _TIED or self._tied_counted]
        local = torch.zeros((), device=self.env.device, dtype=torch.float32)
        if counted:
            norm = torch.nn.utils.get_total_norm(counted)  # type: ignore[arg-type]
            if is_dtensor(norm):  # FSDP2 shards: the norm over the stage's dp_shard ranks
                norm = norm.full_tensor()  # type: ignore[attr-defined]
            local = norm.float() ** 2
        if self.mesh is not None:
            dist.all_reduce(local, group=self.mesh["pp"].get_group())
        total = local.sqrt()
        torch.nn.utils.clip_grads_with_norm_([p for _, p in named], max_norm, total)
        return total

    # ------------------------------------------------------------------ states
    def _with_group_names(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, optim_sd: StateDict
    ) -> StateDict:
        """``optim_sd`` with every parameter group naming the parameters of that group on
        every stage: the same on every rank, so DCP writes it once and any layout (one
        process, FSDP) finds its own parameters' groups in it. Collective on first use."""
        if id(optimizer) not in self._group_names:
            mine = [list(group["params"]) for group in optim_sd.get("param_groups", [])]
            every: list[Any] = [None] * len(self._ranks)
            group = self.mesh["pp"].get_group() if self.mesh is not None else None
            dist.all_gather_object(every, mine, group=group)
            if len({len(names) for names in every}) != 1:
                raise ConfigError(
                    "training.distributed.strategy pipeline: the stages' optimizers have "
                    "different numbers of parameter groups; every stage needs weight matrices "
                    "and norms (at least one block each)"
                )
            self._group_names[id(optimizer)] = [
                list(dict.fromkeys(name for names in every for name in names[g]))
                for g in range(len(mine))
            ]
        names = self._group_names[id(optimizer)]
        groups = [{**group, "params": names[g]} for g, group in enumerate(optim_sd["param_groups"])]
        return {"state": optim_sd["state"], "param_groups": groups}

    def sharded_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[StateDict, StateDict]:
        """This rank's stages' tensors (plain, by the model's names; a tied one on two ranks,
        alike, written once) and their optimizer state."""
        model_sd, optim_sd = sharded_state(model, optimizer)
        if optimizer is not None and self.sharded:
            optim_sd = self._with_group_names(model, optimizer, optim_sd)
        return model_sd, optim_sd

    def load_sharded_state_dict(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        model_sd: StateDict | None,
        optim_sd: StateDict,
    ) -> None:
        load_sharded_state(model, optimizer, model_sd, optim_sd)

    def full_state_dict(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> tuple[StateDict, StateDict]:
        """Every stage's tensors and optimizer state, on the CPU, gathered on rank 0 (``{}``
        elsewhere). Collective."""
        if not self.sharded:
            return super().full_state_dict(model, optimizer)
        model_sd, optim_sd = self.sharded_state_dict(model, optimizer)
        mine = _to_cpu({"model": model_sd, "state": optim_sd.get("state", {})})  # collective
        if self.dims.dp_rank(self.env.rank) != 0:
            mine = {"model": {}, "state": {}}  # the first data-parallel rank's copy suffices
        every: list[Any] = [None] * self.env.world_size if self.env.is_main else []
        dist.gather_object(mine, every if self.env.is_main else None, dst=0)
        if not self.env.is_main:
            return {}, {}
        full_model: StateDict = {}
        full_state: StateDict = {}
        for part in every:
            full_model.update(part["model"])
            full_state.update(part["state"])
        if optimizer is None:
            return full_model, {}
        return full_model, {"state": full_state, "param_groups": optim_sd["param_groups"]}

    def load_full_state_dict(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        model_sd: StateDict | None,
        optim_sd: StateDict,
    ) -> None:
        """Load this rank's part of full states (given on every rank, or on rank 0 only:
        then sent to every rank first). Collective."""
        if not self.sharded:
            load_full_state(model, optimizer, model_sd, optim_sd)
            return
        shared = [model_sd, optim_sd] if self.env.is_main else [None, None]
        dist.broadcast_object_list(shared, src=0)
        full_model, full_optim = shared
        names = set(model.state_dict())
        local_model = None if full_model is None else {
            k: v for k, v in full_model.items() if k in names
        }  # fmt: skip
        local_optim: StateDict = {}
        if full_optim:  # keyed by name: this rank's parameters of each group, and their state
            state = {k: v for k, v in full_optim.get("state", {}).items() if k in names}
            groups = [
                {**g, "params": [n for n in g["params"] if n in names]}
                for g in full_optim.get("param_groups", [])
            ]
            local_optim = {"state": state, "param_groups": groups}
        load_full_state(model, optimizer, local_model, local_optim)


def _check_model(model: nn.Module) -> None:
    """Refuse what the stages cannot run (ConfigError names the key and the fix)."""
    if not isinstance(model, APTModel):
        raise ConfigError(
            f"training.distributed.strategy pipeline splits APT models (model:), not a "
            f"{type(model).__name__}; use another strategy for your own module"
        )
    config = model.config
    refused = {
        "model.moe": config.moe is not None,
        "model.align": config.align is not None or model.align is not None,
        "model.voter": config.voter is not None,
        "finetune.lora": any("lora_" in name for name, _ in model.named_parameters()),
    }
    for key, present in refused.items():
        if present:
            raise ConfigError(
                f"{key} under training.distributed.strategy pipeline is not supported yet "
                "(its losses or state do not travel between stages); remove it, or use "
                "strategy ddp or fsdp"
            )


def _empty_the_rest(model: nn.Module, pieces: Any) -> None:
    """Move the model's modules that no piece of this rank holds to the meta device: their
    memory is freed; the names and shapes stay (an export reads them)."""
    held = {id(p) for piece in pieces for p in piece.parameters()}
    emptied: dict[int, nn.Parameter] = {}  # one meta tensor per tensor: ties stay tied
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in held or param.device.type == "meta":
                continue
            if id(param) not in emptied:
                emptied[id(param)] = nn.Parameter(param.to("meta"), param.requires_grad)
            setattr(module, name, emptied[id(param)])


def _to_cpu(tree: Any) -> Any:
    """Whole CPU copies of the tensors in ``tree``; an FSDP2 shard is gathered over its
    stage's dp_shard ranks (collective: they hold the same names, in the same order)."""
    if is_dtensor(tree):
        return tree.full_tensor().detach().to("cpu", copy=True)
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree
