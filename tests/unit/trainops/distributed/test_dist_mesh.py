"""The parallel degrees (config shorthand, aliases, arithmetic), the rank layout of the mesh,
and the tensor-parallel plan's checks that need no process group."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from apt import load_profile
from apt.core.config.distributed import DistributedConfig
from apt.core.config.model import ModelConfig
from apt.core.errors import ConfigError
from apt.model import build_model
from apt.model.architectures.sharding import APT_TENSOR_PLAN
from apt.trainops.distributed import DistEnv, ParallelDims, build_strategy
from apt.trainops.distributed.tensor_parallel import _matches, apply_tp

TINY = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8)


def rank_env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=torch.device("cpu"),
                   backend="gloo")  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("ddp", {"pp": 1, "dp_replicate": 4, "dp_shard": 1, "tp": 1}),
        ("fsdp", {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 1}),
        ("tensor", {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 4}),
        ("pipeline", {"pp": 4, "dp_replicate": 1, "dp_shard": 1, "tp": 1}),
    ],
)
def test_the_strategy_fills_its_own_degree(strategy: str, expected: dict[str, int]) -> None:
    assert DistributedConfig(strategy=strategy).degrees(4) == expected


def test_seed_002_aliases() -> None:
    assert DistributedConfig(strategy="tensor", tensor_parallel=2).tp == 2
    assert DistributedConfig(strategy="fsdp", data_parallel=2).degrees(2)["dp_shard"] == 2
    assert DistributedConfig(strategy="ddp", data_parallel=2).degrees(2)["dp_replicate"] == 2
    assert DistributedConfig(pipeline_parallel=1, expert_parallel=1).pp == 1
    cfg = load_profile(
        "cpu/tiny",
        overrides=[
            "training.distributed.strategy=tensor",
            "training.distributed.tensor_parallel=2",
        ],
    )
    assert cfg.training.distributed.tp == 2


def test_degrees_that_miss_the_world_size_show_the_arithmetic() -> None:
    with pytest.raises(ValidationError, match=r"tp 4 = 4, but the world size is 2"):
        DistributedConfig(strategy="tensor", tp=4, world_size=2)  # known at load time
    cfg = DistributedConfig(strategy="tensor", tp=4)  # known at run start only
    with pytest.raises(ConfigError, match=r"tp 4 = 4, but the world size is 2 \(torchrun"):
        build_strategy(cfg, env=rank_env(0, 2))


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"strategy": "ddp", "pp": 2}, r"strategy ddp with pp 2 combines"),
        (
            {"strategy": "ddp", "expert_parallel": 2},
            r"distributed\.ep is 2, but expert parallelism runs under strategy expert only",
        ),
        ({"strategy": "expert", "ep": 4, "world_size": 2}, r"ep 4 on 2 data-parallel ranks"),
        ({"strategy": "tensor", "dp_shard": 2}, r"strategy tensor with dp_shard 2 combines"),
        ({"strategy": "fsdp", "data_parallel": 2, "dp_shard": 4}, r"keep one"),
    ],
)
def test_what_is_not_supported_yet_is_refused_at_load_time(given: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        DistributedConfig(**given)


def test_rank_layout_keeps_tp_groups_together() -> None:
    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=2)
    assert dims.world_size == 4 and dims.dp_size == 2
    assert dims.dp_groups() == [[0, 2], [1, 3]]
    assert [dims.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert str(dims) == "dp_replicate 1 x dp_shard 2 x tp 2"


@pytest.mark.parametrize(("strategy", "expected"), [("tensor", (0, 1)), ("ddp", (1, 2))])
def test_sampler_shards_by_data_parallel_rank(strategy: str, expected: tuple[int, int]) -> None:
    # No process group: no mesh, but the degrees (and so the sampler) are the run's.
    built = build_strategy(DistributedConfig(strategy=strategy), env=rank_env(1, 2))
    assert built.sampler_rank_world() == expected


def test_every_pattern_of_the_plan_names_modules_of_the_model() -> None:
    names = [name for name, _ in build_model(TINY).named_modules()]
    for pattern in [*APT_TENSOR_PLAN.layers, *APT_TENSOR_PLAN.heads]:
        assert any(_matches(pattern, name) for name in names), pattern
    assert _matches("blocks.*.attn.q_proj", "blocks.11.attn.q_proj")
    assert not _matches("blocks.*.attn.q_proj", "blocks.1.attn.q_proj.lora_a")


class _Mesh:
    """Only what apply_tp reads before its first collective."""

    def size(self) -> int:
        return 2


def test_heads_not_divisible_by_tp_is_a_config_error() -> None:
    model = build_model(TINY.model_copy(update={"hidden_size": 24, "num_heads": 3}))
    with pytest.raises(ConfigError, match=r"tp 2 .* num_heads 3 and num_kv_heads 3"):
        apply_tp(model, tp_mesh=_Mesh())  # type: ignore[arg-type]
