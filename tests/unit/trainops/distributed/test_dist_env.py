"""setup_distributed: the launcher's variables, their errors, and an already running group."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from apt.core.errors import DistributedError
from apt.trainops.distributed import (
    DistEnv,
    read_launcher_env,
    setup_distributed,
    teardown_distributed,
)


def test_read_launcher_env_reads_the_torchrun_variables() -> None:
    env = read_launcher_env(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500",
            "OTHER": "x",
        }
    )
    assert (env.rank, env.local_rank, env.world_size) == ("3", "1", "4")
    assert (env.master_addr, env.master_port) == ("node0", "29500")
    assert read_launcher_env({}).world_size is None


@pytest.mark.parametrize("world", [None, "1"])
def test_without_a_launcher_it_is_one_process(no_launcher_env, world) -> None:
    if world:
        no_launcher_env.setenv("WORLD_SIZE", world)
    env = setup_distributed(device="cpu")
    assert env == DistEnv.single("cpu")
    assert (env.rank, env.world_size, env.backend, env.is_main) == (0, 1, None, True)
    assert not env.is_distributed
    assert not dist.is_initialized()


def test_dist_env_is_frozen_and_derives_is_main() -> None:
    env = DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"), backend="gloo")
    assert env.is_main is False and env.is_distributed
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.rank = 0  # type: ignore[misc]


def _launch(mp: pytest.MonkeyPatch, **values: str) -> None:
    for key, value in values.items():
        mp.setenv(key, value)


def test_missing_master_addr_names_rank_and_fix(no_launcher_env) -> None:
    _launch(no_launcher_env, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_PORT="29500")
    with pytest.raises(DistributedError, match=r"rank 1: .*MASTER_ADDR is missing.*torchrun"):
        setup_distributed("gloo")
    assert not dist.is_initialized()


def test_missing_rank_is_reported(no_launcher_env) -> None:
    _launch(no_launcher_env, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with pytest.raises(DistributedError, match="RANK is missing"):
        setup_distributed("gloo")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"WORLD_SIZE": "two"}, "not an integer"),
        ({"RANK": "2"}, r"RANK must be in \[0, 2\)"),
        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
    ],
)
def test_inconsistent_launcher_values(no_launcher_env, values, message) -> None:
    base = {
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    _launch(no_launcher_env, **{**base, **values})
    with pytest.raises(DistributedError, match=message):
        setup_distributed("gloo")


def test_config_world_size_must_match_the_launcher(no_launcher_env) -> None:
    _launch(
        no_launcher_env,
        WORLD_SIZE="2",
        RANK="0",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
    with pytest.raises(DistributedError, match=r"world_size is 4 but the launcher started 2"):
        setup_distributed("gloo", expected_world_size=4)
    assert not dist.is_initialized()  # checked before any connection is tried


def test_single_process_with_configured_world_size_fails(no_launcher_env) -> None:
    with pytest.raises(DistributedError, match=r"world_size is 2 but the launcher started 1"):
        setup_distributed(expected_world_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_nccl_without_cuda_says_use_gloo(no_launcher_env) -> None:
    _launch(
        no_launcher_env,
        WORLD_SIZE="2",
        RANK="0",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
    with pytest.raises(DistributedError, match=r"needs CUDA.*backend: gloo"):
        setup_distributed("nccl")


def test_unknown_backend(no_launcher_env) -> None:
    _launch(
        no_launcher_env,
        WORLD_SIZE="2",
        RANK="0",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    )
    with pytest.raises(DistributedError, match="unknown backend 'mpi'"):
        setup_distributed("mpi")


def test_running_group_is_reused(no_launcher_env, gloo_world1) -> None:
    first = setup_distributed()
    again = setup_distributed("gloo")
    assert first == again
    assert (first.backend, first.world_size, first.rank) == ("gloo", 1, 0)
    assert first.device == torch.device("cpu")
    with pytest.raises(DistributedError, match="already runs backend 'gloo'"):
        setup_distributed("nccl")


def test_teardown_is_idempotent(no_launcher_env) -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    teardown_distributed()
    assert not dist.is_initialized()
    teardown_distributed()


@pytest.mark.parametrize(
    ("extra", "namespace"),
    [
        ({}, None),  # not under torchelastic
        ({"TORCHELASTIC_RESTART_COUNT": "2"}, None),  # the workers host their own store
        (
            {"TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"},
            "apt/attempt-2",
        ),
        (  # several agents, an elastic rendezvous: their restart counts may differ
            {
                "TORCHELASTIC_RESTART_COUNT": "1",
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "GROUP_WORLD_SIZE": "2",
            },
            None,
        ),
        (  # several agents under `apt launch` (static rendezvous): they restart together
            {
                "TORCHELASTIC_RESTART_COUNT": "1",
                "TORCHELASTIC_USE_AGENT_STORE": "True",
                "GROUP_WORLD_SIZE": "2",
                "APT_STATIC_RENDEZVOUS": "1",
            },
            "apt/attempt-1",
        ),
    ],
)
def test_each_restart_gets_its_own_store_namespace(extra: dict, namespace: str | None) -> None:
    """torchrun's static rendezvous keeps one TCPStore across restarts; the keys a dead
    attempt left there must not be read by the next one."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **extra}
    assert read_launcher_env(env).attempt_namespace() == namespace


def test_a_launchers_world_of_one_is_a_process_group(no_launcher_env) -> None:
    """torchrun --nproc-per-node 1: seed 002's DDPWrapper right after setup_distributed()."""
    import socket

    from torch import nn

    from apt.trainops.distributed import DDPWrapper

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _launch(
        no_launcher_env,
        WORLD_SIZE="1",
        RANK="0",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        env = setup_distributed("gloo", timeout_seconds=30, device="cpu")
        assert dist.is_initialized() and (env.world_size, env.backend) == (1, "gloo")
        model = DDPWrapper(nn.Linear(3, 2))
        model(torch.randn(4, 3)).sum().backward()
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        assert model.module.weight.grad is not None
    finally:
        teardown_distributed()
