"""``strategy: pipeline`` without a process group: the options, how the blocks split into
stages and which rank holds each, the micro-batch count, the pieces of the model (they
compose to the whole model's forward, under its parameter names) and what is refused."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from apt.core.config.distributed import DistributedConfig, PipelineOptions
from apt.core.config.model import ModelConfig
from apt.core.errors import ConfigError
from apt.model import build_model
from apt.model.architectures.stages import APTStage, head_is_tied
from apt.trainops.distributed import DistEnv, ParallelDims, build_strategy
from apt.trainops.distributed.pipeline import PipelinedModel, split_layers, stage_owner
from apt.trainops.distributed.strategies.pipeline import _check_model
from apt.trainops.engine.tasks.causal_lm import CausalLMTask
from apt.trainops.engine.tasks.regression import RegressionTask

TINY = ModelConfig(vocab_size=32, hidden_size=16, num_layers=4, num_heads=2, max_seq_len=8)


def rank_env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                   backend="gloo")  # fmt: skip


def test_the_strategy_fills_pp_and_the_alias_sets_it() -> None:
    assert DistributedConfig(strategy="pipeline").degrees(2)["pp"] == 2
    assert DistributedConfig(strategy="pipeline", pipeline_parallel=2).pp == 2
    with pytest.raises(ValidationError, match=r"strategy pipeline with tp 2 combines"):
        DistributedConfig(strategy="pipeline", tp=2)


def test_blocks_split_evenly_or_at_the_points_given() -> None:
    assert split_layers(8, 2) == [range(0, 4), range(4, 8)]
    assert split_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert split_layers(5, 2, [1]) == [range(0, 1), range(1, 5)]
    with pytest.raises(ConfigError, match=r"num_layers 6 does not split evenly over 4 pipeline"):
        split_layers(6, 4)
    with pytest.raises(ConfigError, match=r"split_points \[2, 3\]: 2 stages .* need 1"):
        split_layers(6, 2, [2, 3])
    with pytest.raises(ConfigError, match=r"split_points \[6\]"):
        split_layers(6, 2, [6])


def test_stages_loop_over_the_ranks() -> None:
    assert [stage_owner(s, 2) for s in range(4)] == [0, 1, 0, 1]  # interleaved: 2 per rank
    assert [stage_owner(s, 4) for s in range(4)] == [0, 1, 2, 3]


def test_options_refuse_stage_counts_the_schedule_cannot_run() -> None:
    assert PipelineOptions().local_stages == 1
    assert PipelineOptions(schedule="interleaved_1f1b").local_stages == 2
    with pytest.raises(ValidationError, match=r"interleaved schedule needs at least 2"):
        PipelineOptions(schedule="interleaved_1f1b", stages_per_rank=1)
    with pytest.raises(ValidationError, match=r"only interleaved_1f1b runs several stages"):
        PipelineOptions(schedule="1f1b", stages_per_rank=2)
    with pytest.raises(ValidationError, match=r"must be increasing block indices >= 1"):
        PipelineOptions(split_points=[3, 2])


@pytest.mark.parametrize(
    ("given", "batch", "accumulation", "stages", "expected"),
    [
        ({}, 8, 1, 2, 2),  # each loader batch cut in two: one micro-batch per stage
        ({}, 8, 4, 2, 4),  # the accumulation steps are the micro-batches
        ({}, 6, 1, 4, 6),  # 4 does not divide 6: the next divisor that does
        ({"microbatches": 8}, 8, 2, 2, 8),
        ({"schedule": "gpipe", "microbatches": 1}, 8, 1, 2, 1),  # gpipe runs any number
    ],
)
def test_microbatches_cut_the_step_into_equal_pieces(
    given: dict, batch: int, accumulation: int, stages: int, expected: int
) -> None:
    opts = PipelineOptions(**given)
    got = opts.resolve_microbatches(batch_size=batch, accumulation=accumulation, stages=stages)
    assert got == expected


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"microbatches": 3}, r"microbatches is 3: it must be a multiple"),
        ({"microbatches": 1}, r"microbatches is 1, fewer than the 2 pipeline stages"),
    ],
)
def test_microbatches_that_do_not_fit_are_refused(given: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        PipelineOptions(**given).resolve_microbatches(batch_size=8, accumulation=1, stages=2)
    with pytest.raises(ConfigError, match=r"holds 1 sequences .* too few"):
        PipelineOptions().resolve_microbatches(batch_size=1, accumulation=1, stages=2)


def test_pp_is_the_outermost_dimension() -> None:
    dims = ParallelDims(pp=2, dp_shard=2)
    assert dims.world_size == 4 and dims.dp_size == 2
    assert dims.pp_groups() == [[0, 2], [1, 3]]
    assert dims.dp_groups() == [[0, 1], [2, 3]]
    assert [dims.dp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [dims.pp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert str(dims) == "pp 2 x dp_replicate 1 x dp_shard 2 x tp 1"
    assert str(ParallelDims(tp=2)) == "dp_replicate 1 x dp_shard 1 x tp 2"  # as before pp


@pytest.mark.parametrize("tie", [True, False])
def test_pieces_compose_to_the_whole_model_under_its_names(tie: bool) -> None:
    torch.manual_seed(0)
    model = build_model(TINY.model_copy(update={"tie_embeddings": tie})).eval()
    ids = torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        whole = model(ids).logits
        pieces = [
            APTStage(model, r, first=s == 0, last=s == 2)
            for s, r in enumerate(split_layers(4, 3, [1, 3]))
        ]
        x = ids
        for piece in pieces:
            x = piece(x)
    assert torch.equal(x, whole)  # the same operations in the same order
    names = {name for piece in pieces for name, _ in piece.named_parameters()}
    assert names == {name for name, _ in model.named_parameters()}
    assert head_is_tied(model) == tie
    last = dict(pieces[-1].named_parameters())
    assert ("embed_tokens.weight" in last) == tie and ("lm_head.weight" in last) != tie
    # A rank of the interleaved layout holds stages 0 and 2 as one module, the model's names
    held = PipelinedModel({0: pieces[0], 2: pieces[2]}, source=model, forward=None)  # type: ignore[arg-type]
    keys = [k for k in held.state_dict() if k.startswith("blocks.")]
    assert {k.split(".")[1] for k in keys} == {"0", "3"}
    assert "embed_tokens.weight" in held.state_dict() and "norm.weight" in held.state_dict()


def test_models_the_stages_cannot_run_are_refused() -> None:
    moe = build_model(ModelConfig(**{**TINY.model_dump(), "moe": {"num_experts": 2}}))
    with pytest.raises(ConfigError, match=r"model\.moe under training\.distributed\.strategy"):
        _check_model(moe)
    with pytest.raises(ConfigError, match=r"splits APT models .* not a Linear"):
        _check_model(torch.nn.Linear(2, 2))
    _check_model(build_model(TINY))


def test_run_settings_the_schedule_cannot_honour_are_refused() -> None:
    cfg = DistributedConfig(strategy="pipeline")
    with pytest.raises(ConfigError, match=r"training\.precision fp16 under .*pipeline"):
        build_strategy(cfg, env=rank_env(0, 2), precision="fp16")
    strategy = build_strategy(cfg, env=rank_env(0, 2))
    with pytest.raises(ConfigError, match=r"training\.compile: false"):
        strategy.compile(torch.nn.Linear(2, 2))
    assert strategy.sampler_rank_world() == (0, 1)  # every stage reads the same batch


def test_only_language_model_batches_feed_a_pipeline() -> None:
    ids = torch.arange(8).view(1, 8)
    task = CausalLMTask()
    inputs, labels = task.token_targets({"input_ids": ids})
    assert torch.equal(inputs, ids) and labels[0, -1] == -100
    with pytest.raises(ConfigError, match=r"data\.document_mask: false"):
        task.token_targets({"input_ids": ids, "document_ids": torch.zeros_like(ids)})
    with pytest.raises(ConfigError, match=r"cannot run under training\.distributed\.strategy"):
        RegressionTask().token_targets((ids, ids))
