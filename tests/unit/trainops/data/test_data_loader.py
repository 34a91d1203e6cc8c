"""create_dataloader: same batches with any num_workers, and exact mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apt.core.config import DataConfig
from apt.trainops.data import ResumableSampler, build_datasets, create_dataloader


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _dataset(tmp_path: Path):
    for i in range(6):
        (tmp_path / f"f{i}.txt").write_text(f"file {i} " * 40)
    cfg = DataConfig(source="files", train_files=[str(tmp_path / "*.txt")], seq_len=16)
    return build_datasets(cfg).train


def _batches(loader, epochs: int) -> list[torch.Tensor]:
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out.extend(b["input_ids"].clone() for b in loader)
    return out


def test_same_batches_with_0_and_2_workers(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    runs = [
        _batches(create_dataloader(dataset, batch_size=4, num_workers=w, seed=5), epochs=2)
        for w in (0, 2)
    ]
    assert len(runs[0]) == 2 * (len(dataset) // 4) > 4
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert not torch.equal(runs[0][0], runs[0][len(runs[0]) // 2])  # epochs are reshuffled


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_compatible_signature_and_defaults(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path)
    loader = create_dataloader(dataset=dataset, batch_size=32, num_workers=4, shuffle=True)
    assert isinstance(loader.sampler, ResumableSampler)
    assert loader.num_workers == 4 and not loader.persistent_workers and loader.drop_last


class _Noisy(_Indices):
    def __getitem__(self, i: int) -> float:
        return float(np.random.rand()) + i  # an augmentation drawing from numpy's global RNG


def test_worker_seeding_repeats_random_augmentations() -> None:
    def run() -> list[list[float]]:
        loader = create_dataloader(_Noisy(16), batch_size=4, num_workers=2, seed=3)
        return [b.tolist() for b in loader]

    first = run()
    assert first == run()
    assert len({round(v % 1, 6) for batch in first for v in batch}) == 16  # workers differ


def test_resume_through_the_dataloader(tmp_path: Path) -> None:
    batch, k = 3, 4
    loader = create_dataloader(
        _Indices(40), batch_size=batch, num_workers=2, seed=9, rank=1, world_size=2
    )
    loader.sampler.set_epoch(1)
    full = [b.tolist() for b in loader]
    assert len(full) == len(loader) == 20 // batch

    it = iter(loader)
    for _ in range(k):
        next(it)  # workers prefetch further than this; only consumed batches count
    del it

    resumed = create_dataloader(
        _Indices(40), batch_size=batch, num_workers=0, seed=9, rank=1, world_size=2
    )
    resumed.sampler.set_epoch(1)
    resumed.sampler.set_start(k * batch)
    assert [b.tolist() for b in resumed] == full[k:]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # the 16-CPU case
def test_the_default_worker_count_fits_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from apt.trainops.data import loader as loader_module

    data = list(range(8))
    for cpus, expected in ((2, 2), (16, 4)):
        monkeypatch.setattr(loader_module, "available_cpus", lambda cpus=cpus: cpus)
        assert create_dataloader(data, batch_size=2).num_workers == expected
