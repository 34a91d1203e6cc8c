"""Writer / non-writer ranks through the barrier protocol (ranks as threads, one shared folder)."""

from __future__ import annotations

import json
import threading

import pytest

from apt.trainops.checkpoints import CheckpointManager, CheckpointSaveError


def _ranks(ckpt_dir, world: int, **kwargs):
    barrier = threading.Barrier(world, timeout=30)
    return [
        CheckpointManager(
            save_dir=ckpt_dir,
            is_writer=rank == 0,
            barrier=barrier.wait,
            rank=rank,
            world_size=world,
            **kwargs,
        )
        for rank in range(world)
    ]


def _on_all(managers, fn):
    results, errors = [None] * len(managers), []

    def run(i):
        try:
            results[i] = fn(managers[i])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(managers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("use_async", [False, True])
def test_two_ranks_save_and_load(ckpt_dir, setup_factory, use_async):
    models = [setup_factory(0).model, setup_factory(0).model]
    managers = _ranks(ckpt_dir, 2, async_save=use_async)

    def save(m):
        m.save(5, model=models[m.rank], trainer_state={"by": m.rank})
        m.wait()

    _on_all(managers, save)
    path = ckpt_dir / "step-000000005"
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2
    assert {
        "rng/rank-00000.json",
        "rng/rank-00001.json",
        "rng/rank-00001.safetensors",
        "model/model.safetensors",
    } <= set(manifest["files"])
    assert json.loads((path / "trainer_state.json").read_text()) == {"by": 0}  # writer only
    loaded = _on_all(managers, lambda m: m.load_latest(model=models[m.rank]))
    assert [x.step for x in loaded] == [5, 5]
    assert all(x.rng_state is not None for x in loaded)


def test_writer_refuses_to_commit_without_every_rank(ckpt_dir, setup_factory):
    manager = CheckpointManager(save_dir=ckpt_dir, world_size=2)  # rank 1 never writes
    with pytest.raises(CheckpointSaveError, match=r"rank\(s\) \[1\] wrote no RNG state"):
        manager.save(1, model=setup_factory(0).model)
    assert manager.list_checkpoints() == [] and list(ckpt_dir.iterdir()) == []


def test_fewer_rng_files_than_ranks_warns(ckpt_dir, setup_factory, caplog):
    model = setup_factory(0).model
    CheckpointManager(save_dir=ckpt_dir).save(1, model=model)  # written by one process
    loaded = CheckpointManager(save_dir=ckpt_dir, rank=1, world_size=2, is_writer=False).load(
        1, model=model
    )
    assert loaded.rng_state is None
    assert "no RNG state for rank 1" in caplog.text
