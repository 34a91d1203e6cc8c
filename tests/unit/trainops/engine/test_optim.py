"""Optimizer factory: decay only on weight matrices; the kind picks the class."""

from __future__ import annotations

import torch
from torch import nn

from apt.core.config.training import AdamConfig, AdamWConfig, SGDConfig
from apt.trainops.engine.optim import build_optimizer


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_parameter_groups_exclude_bias_norm_and_embeddings() -> None:
    model = Tiny()
    opt = build_optimizer(AdamWConfig(weight_decay=0.1), model=model, learning_rate=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.lin.weight)}
    assert {id(p) for p in plain["params"]} == {
        id(model.emb.weight),
        id(model.lin.bias),
        id(model.norm.weight),
        id(model.norm.bias),
    }
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len(list(model.parameters()))  # the tied weight appears once


def test_kinds() -> None:
    model = Tiny()
    assert type(build_optimizer(AdamConfig(), model=model, learning_rate=1e-3)) is torch.optim.Adam
    sgd = build_optimizer(SGDConfig(momentum=0.8, nesterov=True), model=model, learning_rate=0.1)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["nesterov"] is True
