"""Registry, build_strategy checks, block discovery and the wrappers' options (1-rank group)."""

from __future__ import annotations

import warnings

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from apt.core.config.distributed import DDPOptions, DistributedConfig, FSDPOptions
from apt.core.config.model import ModelConfig, MoEConfig
from apt.core.errors import ConfigError, DistributedError
from apt.model import build_model
from apt.trainops.distributed import (
    STRATEGIES,
    DDPStrategy,
    DDPWrapper,
    DistEnv,
    FSDPStrategy,
    SingleStrategy,
    build_strategy,
    unwrap_model,
)
from apt.trainops.distributed.ddp_wrapper import model_has_moe
from apt.trainops.distributed.strategies import transformer_blocks
from apt.trainops.distributed.strategies.base import compile_arguments

CPU = DistEnv.single("cpu")
TINY = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8)


class Stack(nn.Module):
    def __init__(self, attr: str = "blocks", n: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        setattr(self, attr, nn.ModuleList(nn.Linear(4, 4) for _ in range(n)))
        self.head = nn.Linear(4, 8)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for child in self.children():
            if isinstance(child, nn.ModuleList):
                for layer in child:
                    h = h + layer(h)
        return self.head(h).clone()


def test_registry_lists_the_strategies_and_suggests_on_typos() -> None:
    names = ["ddp", "expert", "fsdp", "hybrid", "pipeline", "sequence", "single", "tensor"]
    assert STRATEGIES.names() == names
    with pytest.raises(ConfigError, match=r"Did you mean 'fsdp'"):
        STRATEGIES.get("fdsp")


@pytest.mark.parametrize(
    ("name", "cls"), [("single", SingleStrategy), ("ddp", DDPStrategy), ("fsdp", FSDPStrategy)]
)
def test_build_strategy_picks_the_class(name: str, cls: type) -> None:
    strategy = build_strategy(DistributedConfig(strategy=name), env=CPU)
    assert type(strategy) is cls and strategy.name == name
    assert strategy.sampler_rank_world() == (0, 1)
    assert strategy.sharded is False  # no process group: nothing is sharded


def test_world_size_mismatch_is_an_error() -> None:
    with pytest.raises(DistributedError, match="world_size is 4 but the launcher started 1"):
        build_strategy(DistributedConfig(strategy="ddp", world_size=4), env=CPU)


def test_single_on_several_processes_is_an_error() -> None:
    env = DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(DistributedError, match=r"rank 1: .*'single'.*strategy=ddp"):
        build_strategy(DistributedConfig(), env=env)


def test_cpu_offload_needs_cuda() -> None:
    cfg = DistributedConfig(strategy="fsdp", fsdp=FSDPOptions(cpu_offload=True))
    with pytest.raises(DistributedError, match="cpu_offload needs CUDA"):
        build_strategy(cfg, env=CPU)


def test_unknown_precision() -> None:
    with pytest.raises(DistributedError, match="unknown precision"):
        build_strategy(DistributedConfig(), env=CPU, precision="fp8")


def test_config_rejects_contradictions_and_typos() -> None:
    with pytest.raises(ValidationError, match="enabled is false"):
        DistributedConfig(enabled=False, strategy="ddp")
    with pytest.raises(ValidationError, match="enabled is true"):
        DistributedConfig(enabled=True)
    with pytest.raises(ValidationError):
        DistributedConfig(ddp={"bucket_mb": 10})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (Stack("blocks", 3), 3),
        (Stack("layers", 2), 2),
        (Stack("h", 4), 4),  # any direct ModuleList
    ],
)
def test_transformer_blocks(model: nn.Module, expected: int) -> None:
    assert len(transformer_blocks(model)) == expected


def test_transformer_blocks_nested_and_none() -> None:
    outer = nn.Module()
    outer.decoder = Stack("layers", 2)
    assert len(transformer_blocks(outer)) == 2
    assert transformer_blocks(nn.Linear(2, 2)) == []


def test_model_has_moe() -> None:
    assert model_has_moe(build_model(TINY.model_copy(update={"moe": MoEConfig()})))
    assert not model_has_moe(build_model(TINY))
    plain = nn.Linear(2, 2)
    assert not model_has_moe(plain)
    plain.controllable_modules = ["moe"]  # type: ignore[assignment]
    assert model_has_moe(plain)


def test_unwrap_strips_compile() -> None:
    model = Stack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(model)
    assert unwrap_model(compiled) is model
    assert SingleStrategy(DistributedConfig(), env=CPU).unwrap(compiled) is model


def test_ddp_wrapper_needs_a_group() -> None:
    with pytest.raises(DistributedError, match="setup_distributed"):
        DDPWrapper(Stack())


def test_ddp_options_reach_ddp(gloo_world1) -> None:
    cfg = DistributedConfig(strategy="ddp", ddp=DDPOptions(bucket_cap_mb=7, static_graph=True))
    model = build_strategy(cfg, env=CPU).apply(Stack())
    assert isinstance(model, DistributedDataParallel)
    assert model.bucket_bytes_cap == 7 * 1024 * 1024
    assert model.static_graph is True and model.find_unused_parameters is False


def test_ddp_finds_unused_parameters_for_moe_models(gloo_world1) -> None:
    strategy = build_strategy(DistributedConfig(strategy="ddp"), env=CPU)
    moe = strategy.apply(build_model(TINY.model_copy(update={"moe": MoEConfig()})))
    assert moe.find_unused_parameters is True
    assert strategy.unwrap(moe) is moe.module
    forced = DistributedConfig(strategy="ddp", ddp=DDPOptions(find_unused_parameters=False))
    dense = build_strategy(forced, env=CPU).apply(
        build_model(TINY.model_copy(update={"moe": MoEConfig()}))
    )
    assert dense.find_unused_parameters is False


def test_plain_ddp_wrapper(gloo_world1) -> None:
    model = Stack()
    wrapped = DDPWrapper(model, bucket_cap_mb=1)
    assert wrapped.module is model and isinstance(wrapped, DistributedDataParallel)


@pytest.mark.parametrize(
    ("precision", "param_dtype", "out_dtype"),
    [
        ("fp32", None, torch.float32),
        ("bf16", None, torch.bfloat16),
        ("bf16", "fp32", torch.float32),  # fsdp.param_dtype wins over training.precision
    ],
)
def test_fsdp_shards_blocks_and_root(gloo_world1, precision, param_dtype, out_dtype) -> None:
    cfg = DistributedConfig(strategy="fsdp", fsdp=FSDPOptions(param_dtype=param_dtype))
    strategy = build_strategy(cfg, env=CPU, precision=precision)
    original = Stack()
    model = strategy.apply(original)
    assert model is original and strategy.sharded
    assert isinstance(model, FSDPModule)
    assert all(isinstance(b, FSDPModule) for b in original.blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = model(torch.zeros(2, 3, dtype=torch.long))
    assert out.dtype == out_dtype
    model.reshard()  # the root stays gathered after forward (reshard_after_forward=False)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_compile_options_go_on_top_of_the_mode() -> None:
    assert compile_arguments("reduce-overhead", {}) == {"mode": "reduce-overhead"}
    merged = compile_arguments("reduce-overhead", {"combo_kernels": True})
    assert merged == {"options": {"triton.cudagraphs": True, "combo_kernels": True}}


def test_an_unknown_compile_option_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"compile_options: combo_kernel is not an inductor"):
        compile_arguments("default", {"combo_kernel": True, "combo_kernels": True})


def test_compile_options_reach_inductor(tmp_path) -> None:
    """Inductor's trace option writes the generated code where it is told: the options were
    in force when the model compiled (the graph cache is off, so it really compiles)."""
    options = {"trace.enabled": True, "trace.debug_dir": str(tmp_path), "fx_graph_cache": False}
    model = nn.Linear(4, 2)
    compiled = SingleStrategy(DistributedConfig(), env=CPU).compile(model, "default", options)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), model(x))
    assert list(tmp_path.rglob("output_code.py"))
