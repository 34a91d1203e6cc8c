"""What the CLI cases cannot show: random streams inside DataLoader workers after a resume.

The packed LM dataset draws no random numbers, so the CLI cases pass with ``num_workers=2``
whatever the workers' seeds are. A dataset that augments (noise, crops, masking) draws from the
worker's torch RNG, seeded by PyTorch with ``base_seed + worker_id`` where ``base_seed`` is
drawn from the loader's generator at every ``iter(loader)``. A resumed process builds a fresh
loader, so its first ``iter`` of epoch e draws the generator's first value, while the
uninterrupted process drew its (e+1)-th: the workers' streams, and the batches, differ.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from apt.trainops.data import create_dataloader

pytestmark = pytest.mark.faults


class NoisyDataset(Dataset[torch.Tensor]):
    """Sample i is i plus noise drawn in the worker, as an augmenting dataset would."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return index + torch.rand(())


def _epoch(loader: torch.utils.data.DataLoader[torch.Tensor], epoch: int) -> torch.Tensor:
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return torch.cat(list(loader))


def _loader() -> torch.utils.data.DataLoader[torch.Tensor]:
    return create_dataloader(NoisyDataset(), batch_size=4, num_workers=2, shuffle=True, seed=7)


def test_worker_random_streams_continue_after_a_resume_at_an_epoch_boundary() -> None:
    uninterrupted = _loader()
    _epoch(uninterrupted, 0)
    expected = _epoch(uninterrupted, 1)
    resumed = _loader()  # a new process resuming at the start of epoch 1
    got = _epoch(resumed, 1)
    assert torch.equal(got.floor(), expected.floor()), "the sample order itself differs"
    assert torch.equal(got, expected), (
        "epoch 1 after a resume drew other worker random numbers than the uninterrupted run"
    )
