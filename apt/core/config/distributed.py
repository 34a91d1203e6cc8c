"""``training.distributed:`` — how a run spreads over processes: the strategy, the degree of
every mesh dimension, and each strategy's options."""

from __future__ import annotations

import itertools
import math
from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from apt.core.config.base import Section
from apt.core.errors import ConfigError

__all__ = [
    "COMBINED_DIMS",
    "MESH_DIMS",
    "STRATEGIES",
    "STRATEGY_DEGREE",
    "DDPOptions",
    "DistributedConfig",
    "FSDPOptions",
    "PipelineOptions",
]

STRATEGIES = ("single", "ddp", "fsdp", "tensor", "sequence", "hybrid", "pipeline", "expert")
#: The mesh dimension each strategy spreads over: the shorthand fills it with the world size.
STRATEGY_DEGREE = {
    "single": None,
    "ddp": "dp_replicate",
    "fsdp": "dp_shard",
    "tensor": "tp",
    "sequence": "tp",
    "hybrid": "dp_shard",
    "pipeline": "pp",
    "expert": "dp_replicate",  # ep borrows the data-parallel ranks: ep = dp_replicate
}
#: The degrees each strategy may combine with its own: hybrid is FSDP2 over tensor-parallel
#: groups (dp_shard x tp) or over pipeline stages (pp x dp_shard, as strategy pipeline with
#: dp_shard); the others run their own degree alone.
COMBINED_DIMS = {"hybrid": ("dp_shard", "tp", "pp"), "pipeline": ("pp", "dp_shard")}
#: Mesh dimensions in mesh order (outermost first), as the DeviceMesh names them.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


class DDPOptions(Section):
    """Options of the ``ddp`` strategy."""

    resume = "free"

    bucket_cap_mb: int = Field(25, ge=1, description="Gradient bucket size.")
    static_graph: bool = Field(False, description="Promise the graph never changes.")
    find_unused_parameters: bool | None = Field(
        None,
        description="Detect parameters without gradients (None: on for models with an "
        "'moe' module, whose idle experts get none).",
    )


class FSDPOptions(Section):
    """Options of the ``fsdp`` strategy (FSDP2 ``fully_shard`` per block)."""

    resume = "free"

    reshard_after_forward: bool = Field(True, description="Free gathered weights after forward.")
    param_dtype: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="Compute dtype of gathered parameters (None: training.precision)."
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field("fp32", description="Gradient reduce dtype.")
    cpu_offload: bool = Field(
        False,
        description="Keep sharded parameters, gradients and optimizer state in CPU memory "
        "(CUDA runs only).",
    )


class PipelineOptions(Section):
    """Options of the ``pipeline`` strategy (``torch.distributed.pipelining``).

    A step trains on the same global batch as one process: the ``gradient_accumulation_steps``
    loader batches of ``batch_size`` sequences are joined and cut into ``microbatches`` equal
    pieces, which the schedule pushes through the stages.
    """

    resume = "free"

    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        "1f1b",
        description="gpipe (every forward, then every backward), 1f1b (one forward, one "
        "backward: at most pp micro-batches of activations alive) or interleaved_1f1b "
        "(several stages per rank, a smaller bubble).",
    )
    microbatches: int | None = Field(
        None,
        ge=1,
        description="Pipeline micro-batches per step; a multiple of "
        "gradient_accumulation_steps whose quotient divides batch_size. None: "
        "gradient_accumulation_steps, each loader batch cut into the fewest pieces that give "
        "at least one micro-batch per stage (pp x stages_per_rank).",
    )
    stages_per_rank: int | None = Field(
        None,
        ge=1,
        description="Stages each rank holds (model chunks). None: 1, or 2 for "
        "interleaved_1f1b (which needs at least 2; gpipe and 1f1b take exactly 1).",
    )
    split_points: list[int] | None = Field(
        None,
        description="Index of the first block of every stage but the first, increasing "
        "(pp x stages_per_rank - 1 of them). None: the blocks split evenly, which needs "
        "model.num_layers divisible by the number of stages.",
    )

    @model_validator(mode="after")
    def _stages_fit_schedule(self) -> PipelineOptions:
        given = self.stages_per_rank
        if self.schedule == "interleaved_1f1b" and given is not None and given < 2:
            raise ValueError(
                f"stages_per_rank {given} with schedule interleaved_1f1b: the interleaved "
                "schedule needs at least 2 stages per rank; set stages_per_rank: 2 or "
                "schedule: 1f1b"
            )
        if self.schedule != "interleaved_1f1b" and given not in (None, 1):
            raise ValueError(
                f"stages_per_rank {given} with schedule {self.schedule}: only "
                "interleaved_1f1b runs several stages per rank; set schedule: interleaved_1f1b "
                "or stages_per_rank: 1"
            )
        points = self.split_points
        if points is not None and (
            not points or points[0] < 1 or any(b <= a for a, b in itertools.pairwise(points))
        ):
            raise ValueError(
                f"split_points {points} must be increasing block indices >= 1 (the first "
                "block of stage 1, of stage 2, ...), e.g. [4] for 8 layers on 2 stages"
            )
        return self

    @property
    def local_stages(self) -> int:
        """Stages per rank, the default filled in."""
        if self.stages_per_rank is not None:
            return self.stages_per_rank
        return 2 if self.schedule == "interleaved_1f1b" else 1

    def resolve_microbatches(self, *, batch_size: int, accumulation: int, stages: int) -> int:
        """The pipeline micro-batches of a step of ``accumulation`` loader batches of
        ``batch_size`` sequences on ``stages`` stages (see ``microbatches``).

        Raises:
            ConfigError: ``microbatches`` is no multiple of ``accumulation`` whose quotient
                divides ``batch_size``, or (1f1b, interleaved) fewer than ``stages``; or no
                default cut gives every stage a micro-batch.
        """
        key = "training.distributed.pipeline.microbatches"
        rows = batch_size * accumulation
        if self.microbatches is None:
            cuts = [k for k in range(1, batch_size + 1) if batch_size % k == 0]
            fits = [k for k in cuts if accumulation * k >= stages]
            if not fits:
                raise ConfigError(
                    f"{key}: a step holds {rows} sequences (training.batch_size {batch_size} x "
                    f"gradient_accumulation_steps {accumulation}), too few for one micro-batch "
                    f"on each of the {stages} pipeline stages; raise training.batch_size or "
                    "gradient_accumulation_steps"
                )
            return accumulation * fits[0]
        n = self.microbatches
        if n % accumulation or batch_size % (n // accumulation):
            raise ConfigError(
                f"{key} is {n}: it must be a multiple of training.gradient_accumulation_steps "
                f"({accumulation}) that cuts each loader batch of {batch_size} sequences "
                f"(training.batch_size) into equal pieces; e.g. {accumulation * 2} or leave it "
                "unset"
            )
        if self.schedule != "gpipe" and n < stages:
            raise ConfigError(
                f"{key} is {n}, fewer than the {stages} pipeline stages, which schedule "
                f"{self.schedule} cannot run; raise it to at least {stages}, or use schedule: "
                "gpipe"
            )
        return n


class DistributedConfig(Section):
    """How the run is spread over processes; started by ``torchrun`` or ``python -m apt launch``.

    The parallel degrees (``pp``, ``dp_replicate``, ``dp_shard``, ``tp``) multiply to the world
    size; ``strategy`` is a shorthand that fills its own degree with what the others leave
    (``ddp``: ``dp_replicate``, ``fsdp``: ``dp_shard``, ``tensor``: ``tp``, ``pipeline``:
    ``pp``). See :meth:`degrees`.
    """

    resume = "free"

    enabled: bool | None = Field(
        None, description="Run distributed. None: true for any strategy but 'single'."
    )
    strategy: Literal[
        "single", "ddp", "fsdp", "tensor", "sequence", "hybrid", "pipeline", "expert"
    ] = Field(
        "single",
        description="Parallelism: single, ddp (dp_replicate), fsdp (dp_shard), tensor (tp), "
        "sequence (tp, with sequence_parallel), hybrid (dp_shard x tp: FSDP2 over "
        "tensor-parallel groups, tp given; or pp x dp_shard: FSDP2 inside each pipeline stage, "
        "pp given), pipeline (pp; dp_shard too: FSDP2 inside each stage) or expert (ep = "
        "dp_replicate: MoE "
        "experts split over the data-parallel ranks); fills its degree with the world size "
        "left by the degrees given.",
    )
    sequence_parallel: bool | None = Field(
        None,
        description="Sequence parallelism inside the tp groups: the norms, dropout and residual "
        "stream hold T / tp positions per rank (reduce-scatter / all-gather around attention "
        "and the MLP instead of all-reduce). None: on under strategy sequence (which is tensor "
        "with it on), off otherwise; strategy hybrid takes true.",
    )
    world_size: int | None = Field(
        None, ge=1, description="Expected number of processes; checked against the launcher's."
    )
    dp_replicate: int | None = Field(
        None,
        ge=1,
        description="Data-parallel replicas (DDP). None: the world size under strategy ddp, "
        "else 1.",
    )
    dp_shard: int | None = Field(
        None,
        ge=1,
        description="Data-parallel shards (FSDP2). None: the world size under strategy fsdp, "
        "else 1.",
    )
    tp: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("tp", "tensor_parallel"),
        description="Tensor-parallel degree (alias tensor_parallel). None: the world size "
        "under strategy tensor, else 1.",
    )
    pp: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("pp", "pipeline_parallel"),
        description="Pipeline-parallel degree: ranks the model's blocks are spread over (alias "
        "pipeline_parallel). None: the world size under strategy pipeline, else 1.",
    )
    ep: int = Field(
        1,
        ge=1,
        validation_alias=AliasChoices("ep", "expert_parallel"),
        description="Expert-parallel degree (alias expert_parallel): ranks the MoE experts are "
        "split over; strategy expert only, where it is the number of data-parallel ranks (1: "
        "that number).",
    )
    data_parallel: int | None = Field(
        None,
        ge=1,
        description="Seed 002's data-parallel degree: sets dp_shard under strategy fsdp, "
        "hybrid and pipeline, dp_replicate otherwise (give one of the two forms).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="c10d backend; auto: nccl on CUDA, gloo on CPU."
    )
    timeout_seconds: int = Field(
        600,
        ge=1,
        le=7 * 24 * 3600,
        description="Collective timeout, at most a week (a dead peer ends "
        "the run after this long instead of hanging).",
    )
    ddp: DDPOptions = Field(default_factory=DDPOptions, description="DDP options.")
    fsdp: FSDPOptions = Field(default_factory=FSDPOptions, description="FSDP options.")
    pipeline: PipelineOptions = Field(
        default_factory=PipelineOptions, description="Pipeline options (strategy pipeline)."
    )

    @model_validator(mode="after")
    def _enabled_agrees(self) -> DistributedConfig:
        if self.enabled is False and self.strategy != "single":
            raise ValueError(
                f"enabled is false but strategy is {self.strategy!r}; remove 'enabled' or set "
                "strategy: single"
            )
        if self.enabled is True and self.strategy == "single":
            raise ValueError("enabled is true but strategy is 'single'; pick ddp, fsdp or tensor")
        return self

    @model_validator(mode="after")
    def _degrees_agree(self) -> DistributedConfig:
        try:
            self._given_degrees()
            if self.world_size is not None and self.strategy != "single":
                self.degrees(self.world_size)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _sequence_parallel_fits(self) -> DistributedConfig:
        wanted, strategy = self.sequence_parallel, self.strategy
        if wanted is False and strategy == "sequence":
            raise ValueError(
                "sequence_parallel is false but strategy is 'sequence' (tensor parallelism with "
                "sequence parallelism on); use strategy tensor, or remove sequence_parallel"
            )
        if wanted and strategy == "tensor":
            raise ValueError(
                "sequence_parallel is true under strategy tensor: say strategy: sequence (tensor "
                "parallelism with sequence parallelism on) and remove sequence_parallel"
            )
        if wanted and strategy == "hybrid" and (self.pp or 1) > 1:
            raise ValueError(
                f"sequence_parallel is true under strategy hybrid with pp {self.pp}: hybrid "
                "over pipeline stages has no tensor-parallel groups to shard the sequence "
                "over; remove sequence_parallel, or use hybrid with tp instead of pp"
            )
        if wanted and strategy not in ("sequence", "hybrid"):
            raise ValueError(
                f"sequence_parallel is true but strategy {strategy!r} has no tensor-parallel "
                "groups to shard the sequence over; use strategy sequence, or hybrid with tp"
            )
        return self

    def _given_degrees(self) -> dict[str, int | None]:
        """The degrees as written (``data_parallel`` moved to its field); refuses the reserved
        and the not yet supported combinations."""
        if self.ep > 1 and self.strategy != "expert":
            raise ConfigError(
                f"training.distributed.ep is {self.ep}, but expert parallelism runs under "
                f"strategy expert only (not {self.strategy}, issue 17); set strategy: expert, "
                "or ep: 1"
            )
        given: dict[str, int | None] = {dim: getattr(self, dim) for dim in MESH_DIMS}
        if self.data_parallel is not None:
            dim = "dp_shard" if self.strategy in ("fsdp", "hybrid", "pipeline") else "dp_replicate"
            if given[dim] is not None and given[dim] != self.data_parallel:
                raise ConfigError(
                    f"training.distributed: data_parallel {self.data_parallel} and {dim} "
                    f"{given[dim]} say the same thing differently; keep one"
                )
            given[dim] = self.data_parallel
        own = STRATEGY_DEGREE[self.strategy]
        combined = COMBINED_DIMS.get(self.strategy, (own,))
        others = [f"{dim} {n}" for dim, n in given.items() if dim not in combined and (n or 1) > 1]
        if others and self.strategy == "hybrid":
            raise ConfigError(
                f"training.distributed: strategy hybrid with {' and '.join(others)}: hybrid "
                "runs dp_shard x tp or pp x dp_shard only; other layouts (dp_replicate x "
                "dp_shard) are not yet supported (issue 17). Leave the other degrees at 1"
            )
        tp, pp = given["tp"] or 1, given["pp"] or 1
        if self.strategy == "hybrid" and tp > 1 and pp > 1:
            raise ConfigError(
                f"training.distributed: strategy hybrid with tp {tp} and pp {pp}: pipeline "
                "stages of tensor-parallel groups (pp x dp_shard x tp) are not yet supported "
                "(issue 17); keep one of tp and pp at 1"
            )
        if self.strategy == "hybrid" and tp < 2 and pp < 2:
            raise ConfigError(
                "training.distributed: strategy hybrid needs its second degree: set tp (FSDP2 "
                "over tensor-parallel groups) or pp (FSDP2 inside pipeline stages), >= 2; "
                "dp_shard is what it leaves of the world size, e.g. tp: 2. For data "
                "parallelism alone use strategy fsdp"
            )
        if others:
            raise ConfigError(
                f"training.distributed: strategy {self.strategy} with {' and '.join(others)} "
                "combines parallelisms, which is not yet supported (issue 17); use one strategy "
                "and leave the other degrees at 1"
            )
        return given

    def degrees(self, world_size: int) -> dict[str, int]:
        """The degree of every mesh dimension (:data:`MESH_DIMS`) on ``world_size`` processes.

        The strategy's own degree, when not given, is what the others leave of the world size;
        every other degree not given is 1.

        Raises:
            ConfigError: the degrees do not multiply to ``world_size`` (shows the arithmetic),
                ``ep`` > 1, or a combination that is not supported yet.
        """
        given = self._given_degrees()
        own = STRATEGY_DEGREE[self.strategy]
        fixed = {dim: n or 1 for dim, n in given.items() if dim != own}
        rest = math.prod(fixed.values())
        out = dict(fixed)
        if own is not None:
            out[own] = given[own] or max(1, world_size // rest)
        product = math.prod(out.values())
        if product != world_size:
            shown = [f"{dim} {out[dim]}" for dim in MESH_DIMS if out[dim] > 1 or dim == own]
            arithmetic = " x ".join(shown or ["every degree 1"])
            raise ConfigError(
                f"training.distributed: {arithmetic} = {product}, but the world size is "
                f"{world_size} (torchrun --nnodes x --nproc-per-node): the degrees must multiply "
                f"to the number of processes. Launch {product} processes, or change the "
                "degrees."
            )
        if self.strategy == "expert" and self.ep > 1 and self.ep != out["dp_replicate"]:
            raise ConfigError(
                f"training.distributed: ep {self.ep} on {out['dp_replicate']} data-parallel "
                "ranks; the experts are split over exactly the data-parallel ranks, so ep must "
                f"be {out['dp_replicate']} (or left out)"
            )
        if self.strategy == "hybrid" and out["dp_shard"] < 2:
            second, alone = ("tp", "tensor (or sequence)") if out["tp"] > 1 else ("pp", "pipeline")
            raise ConfigError(
                f"training.distributed: strategy hybrid with {second} {out[second]} on "
                f"{world_size} processes leaves dp_shard 1, which is {second} alone; use "
                f"strategy {alone}, or launch more processes"
            )
        return {dim: out[dim] for dim in MESH_DIMS}

    @property
    def sequence_sharded(self) -> bool:
        """Sequence parallelism is on (``sequence_parallel``, its default filled in)."""
        if self.sequence_parallel is None:
            return self.strategy == "sequence"
        return self.sequence_parallel

    def check_sequence_length(self, seq_len: int, *, tp: int) -> None:
        """Refuse a ``data.seq_len`` the ``tp`` sequence shards cannot split evenly (only
        while sequence parallelism is on).

        Raises:
            ConfigError: ``seq_len`` is not divisible by ``tp``.
        """
        if self.sequence_sharded and seq_len % tp:
            raise ConfigError(
                f"data.seq_len is {seq_len}, which sequence parallelism (strategy "
                f"{self.strategy}) cannot split into tp {tp} equal shards; choose a data.seq_len "
                f"divisible by {tp} (e.g. {seq_len - seq_len % tp or tp}), or another tp"
            )
