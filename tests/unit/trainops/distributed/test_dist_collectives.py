"""Collectives in one process (identities) and the translation of c10d failures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from apt.core.errors import DistributedError
from apt.trainops.distributed import (
    all_reduce_mean,
    barrier,
    distributed_errors,
    is_main_process,
    rank_zero_only,
)


def test_all_reduce_mean_keeps_type_in_one_process() -> None:
    assert all_reduce_mean(2.5) == 2.5
    metrics = {"loss": 1.0, "acc": 0.5}
    out = all_reduce_mean(metrics)
    assert out == metrics and out is not metrics
    t = torch.tensor([1.0, 3.0])
    r = all_reduce_mean(t)
    assert torch.equal(r, t) and r is not t


def test_all_reduce_mean_in_a_one_rank_group(gloo_world1) -> None:
    assert all_reduce_mean({"loss": 2.0}) == {"loss": 2.0}
    assert torch.equal(all_reduce_mean(torch.ones(2)), torch.ones(2))


def test_rank_zero_only_and_main_process() -> None:
    calls = []

    @rank_zero_only
    def log(x: int) -> int:
        calls.append(x)
        return x * 2

    assert is_main_process()
    assert log(3) == 6 and calls == [3]
    barrier()  # no-op without a group


@pytest.mark.parametrize(
    "raised",
    [
        RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"),
        RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"),
        dist.DistBackendError("NCCL communicator was aborted"),
    ],
)
def test_peer_failures_become_distributed_errors(raised: Exception) -> None:
    with pytest.raises(DistributedError) as info, distributed_errors("training step 7"):
        raise raised
    text = str(info.value)
    assert text.startswith("rank 0 of 1: training step 7 failed")
    assert "timeout_seconds" in text and "torchrun" in text
    assert info.value.__cause__ is raised


def test_model_errors_pass_through_untouched() -> None:
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 4x4)")
    with pytest.raises(RuntimeError) as info, distributed_errors():
        raise error
    assert info.value is error
