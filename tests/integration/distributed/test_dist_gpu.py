"""The same chain on 2 CUDA GPUs with NCCL: contract, equivalence, DCP GPU <-> CPU, bf16, offload.

Skipped without 2 GPUs (CI has none); run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

import math

import dist_contract
import pytest
import torch
from dist_launch import run_chain

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.distributed,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

# Same kernels on both sides (the reference runs on cuda:0 too); only the reduction order and
# NCCL's ring sums differ. TF32 is off for fp32 matmuls by default.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_chain(tmp_path_factory.mktemp("dist_gpu"), "nccl")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_contract_and_equivalence_on_two_gpus(runs: dict, strategy: str) -> None:
    failed = {k: v for k, v in runs[strategy]["contract"].items() if not v["ok"]}
    assert not failed, failed
    assert set(runs[strategy]["contract"]) == set(dist_contract.CONTRACT_CHECKS)
    assert runs[strategy]["contract"]["apply_unwrap"]["devices"] == ["cuda"]
    assert runs[strategy]["equivalence"]["max_loss_rel_err"] < LOSS_RTOL


@pytest.mark.parametrize("run", ["fsdp", "ddp", "fsdp->single", "ddp->single"])
def test_dcp_between_gpu_ranks_and_cpu(runs: dict, run: str) -> None:
    loaded = runs[run] if "->" in run else runs[run]["cross_load"]
    assert loaded["model_equal"] and loaded["optim_equal"]


def test_fsdp_bf16_and_cpu_offload(runs: dict) -> None:
    gpu = runs["fsdp"]["gpu"]
    assert gpu["cpu_offload"] == pytest.approx(gpu["fp32"], rel=1e-5)
    assert all(math.isfinite(x) for x in gpu["bf16"])
    assert gpu["bf16"] == pytest.approx(gpu["fp32"], rel=5e-2)  # bf16 compute, fp32 master
