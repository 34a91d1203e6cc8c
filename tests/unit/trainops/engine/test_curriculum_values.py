"""Scheduled values equal their closed forms at every epoch and step."""

from __future__ import annotations

import math

import pytest

from apt.core.config import AnnealSpec
from apt.trainops.engine.curriculum import anneal_value


@pytest.mark.parametrize("unit", range(6))
def test_linear_by_epoch_hits_start_and_end(unit: int) -> None:
    spec = AnnealSpec(start=1.5, end=0.8, by="epoch")
    assert anneal_value(spec, unit, 6) == pytest.approx(1.5 + (0.8 - 1.5) * unit / 5)


def test_cosine_shape() -> None:
    spec = AnnealSpec(start=1.5, end=1.1, by="epoch", type="cosine")
    values = [anneal_value(spec, u, 5) for u in range(5)]
    expected = [1.1 + 0.4 * (1 + math.cos(math.pi * u / 4)) / 2 for u in range(5)]
    assert values == pytest.approx(expected)
    assert values[0] == pytest.approx(1.5) and values[-1] == pytest.approx(1.1)


def test_warmup_ramps_from_zero_to_start_then_anneals() -> None:
    spec = AnnealSpec(start=0.2, end=0.4, by="step", warmup=10)
    total = 31
    for u in range(10):
        assert anneal_value(spec, u, total) == pytest.approx(0.2 * u / 10)
    assert anneal_value(spec, 10, total) == pytest.approx(0.2)
    assert anneal_value(spec, 20, total) == pytest.approx(0.3)
    assert anneal_value(spec, 30, total) == pytest.approx(0.4)
    assert anneal_value(spec, 99, total) == pytest.approx(0.4)  # holds at the end


def test_degenerate_span_goes_straight_to_end() -> None:
    assert anneal_value(AnnealSpec(start=3.0, end=1.0), 0, 1) == 1.0
