"""The console line: ``step 20: train_loss=2.3410, lr=3.00e-04``."""

from __future__ import annotations

import math

import pytest

from apt.trainops.monitoring import format_metrics


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2.341, "2.3410"),
        (3e-4, "3.00e-04"),
        (0.0, "0.0000"),
        (51234.5, "51234.5000"),
        (123456.0, "1.23e+05"),
        (-0.5, "-0.5000"),
        (7, "7"),
        (math.nan, "nan"),
        (-math.inf, "-inf"),
    ],
)
def test_each_value_reads_as_people_expect(value: float, text: str) -> None:
    assert format_metrics({"x": value}, 3) == f"step 3: x={text}"


def test_metrics_keep_their_order() -> None:
    line = format_metrics({"train_loss": 2.341, "lr": 3e-4, "epoch": 1}, 20)
    assert line == "step 20: train_loss=2.3410, lr=3.00e-04, epoch=1"
