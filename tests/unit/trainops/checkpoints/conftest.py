"""A tiny trainable setup (tied weights, dropout, every RNG in the step) for checkpoint tests."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Embedding -> linear -> dropout -> head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 16)
        return self.head(self.drop(torch.tanh(self.proj(self.emb(idx)))))


@dataclass
class Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def train(self, steps: int) -> list[float]:
        """``steps`` updates whose data and noise come from torch, python and numpy RNGs."""
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, 16, (4, 6))
            scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
            logits = self.model(idx)
            loss = F.cross_entropy(logits.flatten(0, 1), idx.roll(1, dims=1).flatten()) * scale
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss.item())
        return losses

    def objects(self) -> dict[str, object]:
        return {"model": self.model, "optimizer": self.optimizer, "lr_scheduler": self.scheduler}


def make_setup(seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=10)
    return Setup(model, optimizer, scheduler)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def setup_factory():
    """``setup_factory(seed)`` -> a fresh :class:`Setup`."""
    return make_setup


@pytest.fixture
def seed_everything():
    return seed_all


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints"


def payload_bytes(ckpt: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but the manifest (whose timestamp differs), by name."""
    return {
        p.relative_to(ckpt).as_posix(): p.read_bytes()
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name != "MANIFEST.json"
    }


@pytest.fixture
def read_payload():
    return payload_bytes


def resign_manifest(ckpt: Path, edit=None) -> dict:
    """Re-hash every listed file of ``ckpt`` (after ``edit(manifest)``), as a tamperer would, so
    the manifest verifies and only the content can be wrong. Returns the new manifest."""
    import hashlib
    import json

    manifest = ckpt / "MANIFEST.json"
    doc = json.loads(manifest.read_text())
    if edit is not None:
        edit(doc)
    for rel, record in doc["files"].items():
        path = ckpt / rel
        if path.is_file():  # follows links
            data = path.read_bytes()
            record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.write_text(json.dumps(doc))
    return doc


@pytest.fixture
def resign():
    """``resign(ckpt_folder, edit=None)``: see :func:`resign_manifest`."""
    return resign_manifest
