"""``strategy: sequence`` and ``strategy: hybrid``: the config's rules (degrees, the
``sequence_parallel`` key, ``data.seq_len`` divisible by tp) and the sequence plan's checks
that need no process group. The runs themselves: tests/integration/distributed/
test_sequence_parallel.py and test_hybrid_parallel.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from apt.core.config.distributed import DistributedConfig
from apt.core.config.model import ModelConfig, MoEConfig
from apt.core.errors import ConfigError, DistributedError
from apt.model import build_model
from apt.model.architectures.sharding import APT_TENSOR_PLAN, TensorPlan
from apt.trainops.distributed.strategies import STRATEGIES
from apt.trainops.distributed.tensor_parallel import _named, apply_tp

TINY = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8)


@pytest.mark.parametrize(
    ("given", "world", "expected"),
    [
        ({"strategy": "sequence"}, 4, {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 4}),
        ({"strategy": "hybrid", "tp": 2}, 8, {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 2}),
        ({"strategy": "hybrid", "dp_shard": 2, "tp": 2}, 4,
         {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2}),
        ({"strategy": "hybrid", "data_parallel": 2, "tp": 2}, 4,
         {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2}),
        ({"strategy": "hybrid", "pipeline_parallel": 2}, 8,
         {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 1}),
        ({"strategy": "pipeline", "dp_shard": 2}, 8,
         {"pp": 4, "dp_replicate": 1, "dp_shard": 2, "tp": 1}),
        ({"strategy": "pipeline", "data_parallel": 2, "pp": 2}, 4,
         {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 1}),
    ],
)  # fmt: skip
def test_degrees_of_sequence_and_hybrid(given: dict, world: int, expected: dict) -> None:
    assert DistributedConfig(**given).degrees(world) == expected


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"strategy": "hybrid"}, r"strategy hybrid needs its second degree: set tp .* or pp"),
        ({"strategy": "hybrid", "tp": 2, "dp_replicate": 2},
         r"hybrid with dp_replicate 2: hybrid runs dp_shard x tp or pp x dp_shard only"),
        ({"strategy": "hybrid", "tp": 2, "pp": 2}, r"hybrid with tp 2 and pp 2: .*keep one"),
        ({"strategy": "hybrid", "tp": 4, "world_size": 4}, r"leaves dp_shard 1, which is tp"),
        ({"strategy": "hybrid", "pp": 4, "world_size": 4},
         r"leaves dp_shard 1, which is pp alone; use strategy pipeline"),
        ({"strategy": "hybrid", "pp": 2, "sequence_parallel": True},
         r"sequence_parallel is true under strategy hybrid with pp 2"),
        ({"strategy": "pipeline", "tp": 2}, r"strategy pipeline with tp 2 combines"),
        ({"strategy": "hybrid", "tp": 2, "dp_shard": 2, "world_size": 8},
         r"dp_shard 2 x tp 2 = 4, but the world size is 8"),
        ({"strategy": "sequence", "dp_shard": 2}, r"strategy sequence with dp_shard 2 combines"),
        ({"strategy": "fsdp", "tp": 2}, r"strategy fsdp with tp 2 combines"),
        ({"strategy": "tensor", "sequence_parallel": True}, r"say strategy: sequence"),
        ({"strategy": "sequence", "sequence_parallel": False}, r"use strategy tensor"),
        ({"strategy": "fsdp", "sequence_parallel": True}, r"no tensor-parallel groups"),
    ],
)  # fmt: skip
def test_unsupported_layouts_are_refused(given: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        DistributedConfig(**given)


def test_sequence_parallel_is_on_under_sequence_and_when_hybrid_asks() -> None:
    assert DistributedConfig(strategy="sequence").sequence_sharded
    assert not DistributedConfig(strategy="tensor").sequence_sharded
    assert not DistributedConfig(strategy="hybrid", tp=2).sequence_sharded
    assert DistributedConfig(strategy="hybrid", tp=2, sequence_parallel=True).sequence_sharded


def test_seq_len_must_split_into_tp_shards() -> None:
    cfg = DistributedConfig(strategy="sequence")
    cfg.check_sequence_length(32, tp=4)
    with pytest.raises(
        ConfigError, match=r"data\.seq_len is 30, .* tp 4 equal shards.*\(e\.g\. 28\)"
    ):
        cfg.check_sequence_length(30, tp=4)
    DistributedConfig(strategy="tensor").check_sequence_length(30, tp=4)  # no sequence split


def test_both_strategies_are_registered() -> None:
    assert {"sequence", "hybrid"} <= set(STRATEGIES.names())


def test_the_sequence_plan_names_the_norms_dropout_and_the_gathered_regions() -> None:
    model = build_model(TINY.model_copy(update={"dropout": 0.1}))
    plan = APT_TENSOR_PLAN.sequence
    assert plan is not None
    sharded = [name for name, _, _ in _named(model, dict.fromkeys(plan.sharded))]
    gathered = [name for name, _, _ in _named(model, dict.fromkeys(plan.gathered))]
    per_block = [f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn_norm", "mlp_norm", "dropout")]
    assert sharded == [*per_block, "norm"]
    assert gathered == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]


class _Mesh:
    """Only what apply_tp reads before its first collective."""

    def size(self) -> int:
        return 2


def test_moe_blocks_cannot_be_sequence_parallel() -> None:
    model = build_model(TINY.model_copy(update={"moe": MoEConfig(num_experts=2, top_k=1)}))
    with pytest.raises(DistributedError, match=r"blocks\.0\.mlp \(MoEFeedForward\) holds .*router"):
        apply_tp(model, tp_mesh=_Mesh(), sequence=True)  # type: ignore[arg-type]


def test_a_plan_without_a_sequence_part_refuses_sequence_parallelism() -> None:
    plan = TensorPlan(layers=dict(APT_TENSOR_PLAN.layers), heads=dict(APT_TENSOR_PLAN.heads))
    with pytest.raises(DistributedError, match=r"TensorPlan\.sequence"):
        model = build_model(TINY)
        apply_tp(model, tp_mesh=_Mesh(), plan=plan, sequence=True)  # type: ignore[arg-type]
