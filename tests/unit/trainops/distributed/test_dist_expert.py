"""``apply_ep``'s refusals, before any collective: a model without experts, experts not
divisible by the ranks, an MoE layer that is off (the run-level test is
tests/integration/distributed/test_expert_parallel.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from apt.core.config import ModelConfig
from apt.core.errors import ConfigError
from apt.model import APTModel
from apt.trainops.distributed.expert_parallel import apply_ep

TWO_RANKS: Any = SimpleNamespace(size=lambda: 2)  # what apply_ep reads before it splits


def _model(**moe: object) -> APTModel:
    return APTModel(ModelConfig(preset="tiny", vocab_size=256, moe=moe or None))


def test_a_dense_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no MoE experts to split"):
        apply_ep(APTModel(ModelConfig(preset="tiny", vocab_size=256)), ep_mesh=TWO_RANKS)


def test_experts_not_divisible_by_the_ranks_are_refused() -> None:
    with pytest.raises(ConfigError, match="num_experts 3 is not divisible by 2"):
        apply_ep(_model(enabled=True, num_experts=3, top_k=1), ep_mesh=TWO_RANKS)


def test_an_moe_layer_that_is_off_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"MoE layer blocks\.0\.mlp is off"):
        apply_ep(_model(enabled=False, num_experts=4), ep_mesh=TWO_RANKS)
