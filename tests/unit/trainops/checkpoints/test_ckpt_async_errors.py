"""Async saves write what sync saves write; save errors never advertise a partial checkpoint."""

from __future__ import annotations

import errno
import threading

import pytest
import torch
from torch import nn

from apt.trainops.checkpoints import CheckpointManager, CheckpointSaveError


def _big_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)])  # ~2.1M params, 8 MiB


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    return opt


def test_async_payload_equals_sync_byte_for_byte(tmp_path, read_payload):
    model = _big_model()
    opt = _trained(model)
    state = {"epoch": 1, "cursor": 17}
    sync = CheckpointManager(save_dir=tmp_path / "sync")
    torch.manual_seed(5)
    sync_path = sync.save(3, model=model, optimizer=opt, trainer_state=state)
    torch.manual_seed(5)  # same RNG state at both saves
    asyn = CheckpointManager(save_dir=tmp_path / "async", async_save=True)
    async_path = asyn.save(3, model=model, optimizer=opt, trainer_state=state)
    blocking = asyn.last_save_blocking_seconds
    asyn.wait()
    assert read_payload(async_path) == read_payload(sync_path)
    stats = asyn.last_save
    assert stats is not None and stats.step == 3 and stats.bytes_written > 3 * 2**20 * 8
    assert blocking == stats.blocking_seconds < stats.total_seconds


def test_async_snapshot_is_isolated_from_later_training(tmp_path, read_payload):
    model = _big_model()
    opt = _trained(model)
    reference = CheckpointManager(save_dir=tmp_path / "ref").save(1, model=model, optimizer=opt)
    manager = CheckpointManager(save_dir=tmp_path / "a", async_save=True)
    gate = threading.Event()
    original = manager._transaction.write

    def slow_write(files, job):
        gate.wait(10)  # the writer starts only after training has moved on
        original(files, job)

    manager._transaction.write = slow_write  # type: ignore[method-assign]
    path = manager.save(1, model=model, optimizer=opt)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the save is in flight
    gate.set()
    manager.close()
    ref, got = read_payload(reference), read_payload(path)
    assert got["model/model.safetensors"] == ref["model/model.safetensors"]
    assert got["optim/optimizer.pt"] == ref["optim/optimizer.pt"]


def test_one_save_in_flight_and_reused_buffers(tmp_path):
    model = _big_model()
    manager = CheckpointManager(save_dir=tmp_path, async_save=True, keep_last_n=2)
    for step in (1, 2, 3):
        manager.save(step, model=model)  # each waits for the previous
    manager.wait()
    assert [i.step for i in manager.list_checkpoints()] == [2, 3]
    assert manager.last_save.waited_for_previous_seconds >= 0


def test_enospc_sync_leaves_nothing_advertised(tmp_path, monkeypatch, setup_factory):
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=tmp_path)
    manager.save(1, model=run.model)
    monkeypatch.setenv("APT_FAULT_INJECT", "enospc_on_write@2")
    with pytest.raises(CheckpointSaveError) as err:
        manager.save(2, model=run.model, optimizer=run.optimizer)
    assert err.value.disk_full and err.value.step == 2
    msg = str(err.value)
    assert "disk full" in msg and "model.safetensors" in msg and "free on" in msg
    assert "LATEST still names the previous one" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-000000001"]
    assert (tmp_path / "LATEST").read_text().strip() == "step-000000001"
    assert CheckpointManager(save_dir=tmp_path).load_latest().step == 1
    manager.save(3, model=run.model)  # the fault was for step 2 only: saving goes on
    assert manager.latest_step() == 3


def test_enospc_async_is_raised_at_next_save_and_wait(tmp_path, monkeypatch, setup_factory):
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=tmp_path, async_save=True)
    manager.save(1, model=run.model)
    manager.wait()
    monkeypatch.setenv("APT_FAULT_INJECT", "enospc_on_write@2")
    manager.save(2, model=run.model)  # returns; the writer fails in the background
    with pytest.raises(CheckpointSaveError, match="disk full") as err:
        manager.save(3, model=run.model)
    assert err.value.step == 2
    assert manager.latest_step() == 1  # step 3 did not start either
    manager.save(4, model=run.model)
    manager.wait()
    assert manager.latest_step() == 4
    monkeypatch.setenv("APT_FAULT_INJECT", "enospc_on_write@5")
    manager.save(5, model=run.model)
    with pytest.raises(CheckpointSaveError):
        manager.wait()
    manager.wait()  # raised once, not forever
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("step-")) == [
        "LATEST"
    ]


def test_other_write_errors_are_checkpoint_save_errors(tmp_path, setup_factory, monkeypatch):
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=tmp_path)

    def boom(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "x"))

    monkeypatch.setattr("apt.trainops.checkpoints.transaction.write_manifest", boom)
    with pytest.raises(CheckpointSaveError, match="could not write") as err:
        manager.save(1, model=run.model)
    assert not err.value.disk_full
    assert list(tmp_path.iterdir()) == []
