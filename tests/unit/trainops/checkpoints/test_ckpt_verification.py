"""Loading verifies every file; a bad newest checkpoint falls back loudly; debris is ignored."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints import CheckpointManager

MODEL = "model/model.safetensors"


@pytest.fixture
def two_checkpoints(ckpt_dir, setup_factory):
    """Checkpoints of steps 10 and 20 (different weights); returns (manager, setup)."""
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=ckpt_dir, keep_last_n=5)
    run.train(1)
    manager.save(10, **run.objects())
    run.train(1)
    manager.save(20, **run.objects())
    return manager, run


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data), len(data) // 2


def _flip_bit(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_explicit_truncated_file_names_file_and_sizes(two_checkpoints, ckpt_dir):
    manager, _ = two_checkpoints
    full, half = _truncate(ckpt_dir / "step-000000020" / MODEL)
    with pytest.raises(CheckpointError) as err:
        manager.load(20)
    msg = str(err.value)
    assert "step-000000020/model/model.safetensors" in msg
    assert f"expected size {full} bytes, found {half}" in msg


def test_explicit_bit_flip_names_file_and_hashes(two_checkpoints, ckpt_dir):
    manager, _ = two_checkpoints
    path = ckpt_dir / "step-000000020" / "optim/optimizer.pt"
    want = json.loads((ckpt_dir / "step-000000020/MANIFEST.json").read_text())
    _flip_bit(path)
    with pytest.raises(CheckpointError) as err:
        manager.load("step-000000020")
    msg = str(err.value)
    assert "optim/optimizer.pt" in msg
    assert f"expected sha256 {want['files']['optim/optimizer.pt']['sha256']}" in msg
    assert re.search(r"found [0-9a-f]{64}", msg)


def test_explicit_garbage_manifest(two_checkpoints, ckpt_dir):
    manager, _ = two_checkpoints
    (ckpt_dir / "step-000000020/MANIFEST.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"MANIFEST.json: unreadable or not valid JSON"):
        manager.load(20)


def test_missing_file_is_reported(two_checkpoints, ckpt_dir):
    manager, _ = two_checkpoints
    (ckpt_dir / "step-000000020/trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"trainer_state.json: missing"):
        manager.load(20)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_manifest", "missing_file"])
def test_load_latest_falls_back_with_warning(
    two_checkpoints, ckpt_dir, setup_factory, caplog, damage
):
    manager, _ = two_checkpoints
    bad = ckpt_dir / "step-000000020"
    if damage == "truncate":
        _truncate(bad / MODEL)
    elif damage == "flip":
        _flip_bit(bad / MODEL, offset=-1)
    elif damage == "garbage_manifest":
        (bad / "MANIFEST.json").write_text('{"format": "apt-checkpoint", "format_version": 1}')
    else:
        (bad / "rng/rank-00000.json").unlink()
    fresh = setup_factory(3)
    with caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"):
        loaded = CheckpointManager(save_dir=ckpt_dir).load_latest(model=fresh.model)
    assert loaded is not None and loaded.step == 10
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step-000000020" in warning and "CORRUPT" in warning
    assert "step-000000010" in warning  # says what it fell back to
    assert not bad.exists() and any(
        p.name.startswith(".corrupt-step-000000020") for p in ckpt_dir.iterdir()
    )
    # the skipped one no longer counts: the next save is the newest, LATEST follows
    manager.save(30, model=fresh.model)
    assert manager.latest_step() == 30
    assert CheckpointManager(save_dir=ckpt_dir).load_latest().step == 30


def test_load_latest_none_when_empty_or_all_bad(ckpt_dir, setup_factory, caplog):
    assert CheckpointManager(save_dir=ckpt_dir).load_latest() is None
    manager = CheckpointManager(save_dir=ckpt_dir)
    manager.save(1, model=setup_factory(0).model)
    _truncate(ckpt_dir / "step-000000001" / MODEL)
    with caplog.at_level(logging.WARNING):
        assert manager.load_latest() is None
    assert "no good checkpoint left" in caplog.text


def test_debris_is_ignored_then_cleaned(two_checkpoints, ckpt_dir, setup_factory):
    manager, run = two_checkpoints
    stale = ckpt_dir / ".tmp-step-000000030"
    (stale / "model").mkdir(parents=True)
    (stale / "model/model.safetensors").write_bytes(b"partial")
    (ckpt_dir / ".tmp-LATEST").write_text("step-000000030")
    # a step folder without a manifest is not a checkpoint either
    (ckpt_dir / "step-000000040").mkdir()
    assert [i.step for i in manager.list_checkpoints()] == [10, 20]
    assert CheckpointManager(save_dir=ckpt_dir).load_latest().step == 20
    manager.save(30, model=run.model)
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]
    assert manager.load(30).step == 30


def test_resave_existing_step_replaces_it(two_checkpoints, ckpt_dir, setup_factory):
    manager, _ = two_checkpoints
    other = setup_factory(9)
    manager.save(20, model=other.model)
    loaded_model = setup_factory(4).model
    manager.load(20, model=loaded_model)
    assert torch.equal(loaded_model.proj.weight, other.model.proj.weight)
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]


def test_interrupted_replace_restores_the_old_folder(two_checkpoints, ckpt_dir):
    # what a kill between "move old aside" and "rename new into place" leaves
    (ckpt_dir / "step-000000020").rename(ckpt_dir / ".tmp-replaced-step-000000020")
    (ckpt_dir / ".tmp-step-000000020").mkdir()
    loaded = CheckpointManager(save_dir=ckpt_dir).load_latest()
    assert loaded is not None and loaded.step == 20
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]


def test_newest_is_the_latest_commit_not_the_highest_step(two_checkpoints, ckpt_dir):
    manager, run = two_checkpoints
    manager.load(10)  # e.g. a user goes back to step 10 and trains on
    manager.save(15, model=run.model)
    assert manager.latest_step() == 15
    assert CheckpointManager(save_dir=ckpt_dir).load_latest().step == 15
    assert (ckpt_dir / "LATEST").read_text().strip() == "step-000000015"
