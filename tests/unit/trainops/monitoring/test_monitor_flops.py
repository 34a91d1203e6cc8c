"""MFU: FLOPs per token, the peak table, and their ratio."""

from __future__ import annotations

import doctest

import pytest
import torch

from apt.trainops.monitoring import PEAK_FLOPS, flops_per_token, lookup_peak_flops, mfu, peak_flops
from apt.trainops.monitoring import flops as flops_module
from apt.trainops.monitoring import mlflow_logger as mlflow_module
from apt.trainops.monitoring import params as params_module


def test_flops_per_token_of_a_known_shape() -> None:
    # GPT-2 small: 85M non-embedding parameters, 12 layers, 768 wide, 1024 tokens.
    n, layers, hidden, seq = 85_000_000, 12, 768, 1024
    assert flops_per_token(n) == 6 * n
    assert flops_per_token(n, num_layers=layers, hidden_size=hidden, seq_len=seq) == (
        6 * n + 12 * layers * hidden * seq
    )
    assert flops_per_token(n, num_layers=layers, hidden_size=hidden) == 6 * n  # shape unknown
    with pytest.raises(ValueError, match="negative"):
        flops_per_token(-1)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 4090", 165.2e12),
        ("Tesla V100-SXM2-32GB", 125e12),
        ("Tesla V100-PCIE-16GB", 112e12),
        ("AMD Instinct MI300X", 1307.4e12),
        ("NVIDIA GeForce GTX 1080", None),
        ("NVIDIA RTX A4000", None),
    ],
)
def test_the_peak_is_found_by_the_device_name(name: str, peak: float | None) -> None:
    assert lookup_peak_flops(name) == peak


def test_every_table_entry_is_found_by_its_own_name() -> None:
    for key, peak in PEAK_FLOPS.items():
        assert lookup_peak_flops(f"NVIDIA {key.lower()}") == peak, key


def test_cpu_has_no_peak_unless_overridden() -> None:
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops("cpu", 2.5e12) == 2.5e12
    assert peak_flops(torch.device("meta"), None) is None


def test_mfu() -> None:
    # 2 devices of 100 TFLOP/s; 50k tokens/s at 1.2 GFLOP per token: 60 TFLOP/s of 200.
    assert mfu(50_000, 1.2e9, 100e12, 2) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0, 1)


@pytest.mark.parametrize("module", [flops_module, params_module, mlflow_module])
def test_the_docstring_examples_hold(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_a_looked_up_table_does_not_count_but_a_tied_head_does() -> None:
    from torch import nn

    from apt.trainops.monitoring import multiplying_parameters

    class LM(nn.Module):
        def __init__(self, tied: bool) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 8)
            self.positions = nn.Embedding(16, 8)  # looked up only, in both
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 100, bias=False)
            if tied:
                self.head.weight = self.embed.weight

    body = 8 * 8 + 8
    assert multiplying_parameters(LM(tied=False)) == body + 100 * 8  # the head, not the table
    assert multiplying_parameters(LM(tied=True)) == body + 100 * 8  # the shared matrix once


def test_frozen_parameters_count_four_flops_not_six() -> None:
    from torch import nn

    from apt.trainops.monitoring import multiplying_parameters

    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 8), nn.Linear(8, 100))
    n = 8 * 8 + 8 + 8 * 100 + 100
    assert multiplying_parameters(model) == multiplying_parameters(model, trainable_only=True) == n
    assert flops_per_token(n, trainable_params=n) == flops_per_token(n) == 6.0 * n
    model[2].requires_grad_(False)
    model[0].requires_grad_(False)  # looked up only: never counted
    trainable = multiplying_parameters(model, trainable_only=True)
    assert trainable == 8 * 8 + 8
    assert flops_per_token(n, trainable_params=trainable) == 4.0 * n + 2.0 * trainable
    with pytest.raises(ValueError, match="trainable parameters of"):
        flops_per_token(10, trainable_params=11)
