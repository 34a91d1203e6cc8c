"""Tiny models and real text batches for the model tests (as factory fixtures)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from apt.core.config import ModelConfig
from apt.model import APTModel

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _config(**overrides: object) -> ModelConfig:
    """A 2-layer, 64-wide byte-level model: fast on CPU, big enough to learn a little."""
    base: dict[str, object] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "max_seq_len": 64,
    }
    return ModelConfig.model_validate({**base, **overrides})


def _model(seed: int = 0, **overrides: object) -> APTModel:
    torch.manual_seed(seed)
    return APTModel(_config(**overrides))


def _text(batch: int, seq: int, count: int) -> Batches:
    """``count`` (inputs, targets) byte batches of real Python source (the stdlib's os.py)."""
    with open(os.__file__, "rb") as f:
        data = torch.tensor(list(f.read()), dtype=torch.long)
    out = []
    for i in range(count):
        starts = torch.arange(batch) * (seq + 1) * (count + 1) + i * (seq + 1)
        rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def _train(model: APTModel, batches: Batches, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        model(x, y).loss.backward()
        opt.step()


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    return _config


@pytest.fixture
def tiny_model() -> Callable[..., APTModel]:
    return _model


@pytest.fixture
def text_batches() -> Callable[[int, int, int], Batches]:
    return _text


@pytest.fixture
def train() -> Callable[..., None]:
    return _train


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)
