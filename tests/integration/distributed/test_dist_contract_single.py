"""The ``single`` strategy through the same contract as DDP and FSDP (one process, no group)."""

from __future__ import annotations

from pathlib import Path

import dist_contract
import pytest

from apt.core.config.distributed import DistributedConfig
from apt.trainops.distributed import STRATEGIES, DistEnv, build_strategy


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    strategy = build_strategy(DistributedConfig(strategy="single"), env=DistEnv.single())
    return dist_contract.run_contract(strategy, Path(tmp_path_factory.mktemp("single")))


@pytest.mark.parametrize("check", dist_contract.CONTRACT_CHECKS)
def test_single_contract(results: dict, check: str) -> None:
    assert results[check]["ok"], f"single failed contract check {check}: {results[check]}"


def test_every_registered_strategy_is_contract_tested() -> None:
    # single here; ddp and fsdp on two processes in test_dist_multiprocess.py; tensor,
    # sequence, hybrid and pipeline (whose ranks share one batch, which this contract's data
    # split does not know) through the Trainer against one process in test_tensor_parallel.py,
    # test_sequence_parallel.py, test_hybrid_parallel.py and test_pipeline_parallel.py
    names = ["ddp", "expert", "fsdp", "hybrid", "pipeline", "sequence", "single", "tensor"]
    assert STRATEGIES.names() == names
