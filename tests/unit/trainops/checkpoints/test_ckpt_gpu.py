"""CUDA paths: pinned non-blocking async snapshots, CUDA RNG streams, loading onto the GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apt.trainops.checkpoints import CheckpointManager, capture_rng_state, restore_rng_state

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _cuda_setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 1024, device="cuda")).sum().backward()
    opt.step()
    return model, opt


def test_async_snapshot_survives_immediate_gpu_updates(tmp_path, read_payload):
    model, opt = _cuda_setup()
    torch.manual_seed(1)
    reference = CheckpointManager(save_dir=tmp_path / "sync").save(1, model=model, optimizer=opt)
    manager = CheckpointManager(save_dir=tmp_path / "async", async_save=True)
    torch.manual_seed(1)
    path = manager.save(1, model=model, optimizer=opt)
    with torch.no_grad():  # queued right behind the non-blocking copies on the same stream
        for p in model.parameters():
            p.mul_(0).add_(7.0)
        for state in opt.state.values():
            state["exp_avg"].zero_()
    manager.close()
    assert read_payload(path) == read_payload(reference)


def test_cuda_rng_round_trip_through_a_checkpoint(tmp_path):
    model, _ = _cuda_setup()
    torch.cuda.manual_seed(5)
    torch.rand(3, device="cuda")
    manager = CheckpointManager(save_dir=tmp_path)
    manager.save(1, model=model)
    expected = torch.rand(1000, device="cuda")
    torch.rand(77, device="cuda")
    loaded = manager.load(1, model=model, map_location="cuda", restore_rng=True)
    assert (
        loaded.rng_state is not None and len(loaded.rng_state["cuda"]) == torch.cuda.device_count()
    )
    assert torch.equal(torch.rand(1000, device="cuda"), expected)
    state = capture_rng_state()
    a = torch.rand(10, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(10, device="cuda"), a)


def test_load_onto_gpu(tmp_path):
    model, opt = _cuda_setup()
    CheckpointManager(save_dir=tmp_path).save(3, model=model, optimizer=opt)
    torch.manual_seed(9)
    fresh = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    CheckpointManager(save_dir=tmp_path).load(
        3, model=fresh, optimizer=fresh_opt, map_location="cuda"
    )
    for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    for pid, state in opt.state_dict()["state"].items():
        got = fresh_opt.state_dict()["state"][pid]
        assert got["exp_avg"].is_cuda and torch.equal(got["exp_avg"], state["exp_avg"])
