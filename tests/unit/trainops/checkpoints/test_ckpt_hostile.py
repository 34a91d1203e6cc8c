"""Hostile checkpoints: links, paths that leave the folder, FIFOs, DCP chunks stored elsewhere.

Each is refused like a bad hash: an explicit load raises CheckpointError naming the file and
why; load_latest warns, moves the checkpoint aside and falls back to the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.config.distributed import DistributedConfig
from apt.core.errors import CheckpointError
from apt.trainops.checkpoints import CheckpointManager, ShardedStatePayload
from apt.trainops.checkpoints.dcp import read_dcp_tensors
from apt.trainops.checkpoints.fsio import open_inside, read_inside
from apt.trainops.distributed import DistEnv, build_strategy

MODEL = "model/model.safetensors"
NEW, OLD = "step-000000020", "step-000000010"


@pytest.fixture
def two(ckpt_dir, setup_factory):
    """Checkpoints of steps 10 and 20 (different weights); returns the manager."""
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=ckpt_dir, keep_last_n=5)
    for step in (10, 20):
        run.train(1)
        manager.save(step, **run.objects())
    return manager


def _falls_back(ckpt_dir, setup_factory, caplog, *, bad=NEW, to=10, names=()):
    """load_latest skips ``bad`` with a warning (naming it, ``names`` and the fall-back)."""
    fresh = setup_factory(3)
    with caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"):
        loaded = CheckpointManager(save_dir=ckpt_dir).load_latest(**fresh.objects())
    assert loaded is not None and loaded.step == to
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"CHECKPOINT {bad} IS CORRUPT" in warning and f"Falling back to step-{to:09d}" in warning
    for name in names:
        assert name in warning
    assert not (ckpt_dir / bad).is_symlink() and not (ckpt_dir / bad).exists()
    assert (ckpt_dir / f".corrupt-{bad}").exists() or (ckpt_dir / f".corrupt-{bad}").is_symlink()
    return warning


def _outside_copy(src: Path, tmp_path: Path) -> Path:
    """An identical copy of ``src`` outside the checkpoints folder."""
    dest = tmp_path / "elsewhere" / src.name
    dest.parent.mkdir(exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)
    return dest


# ------------------------------------------------------------------ the confinement primitive
def test_open_inside_reads_a_regular_file_and_refuses_everything_else(tmp_path):
    root = tmp_path / "ck"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f.bin").write_bytes(b"data")
    (tmp_path / "outside.bin").write_bytes(b"data")
    (root / "link.bin").symlink_to(tmp_path / "outside.bin")
    (root / "dirlink").symlink_to(root / "a")
    os.mkfifo(root / "pipe")
    with open_inside(root, "a/f.bin") as fh:
        assert fh.read() == b"data"
    refusals = {
        "link.bin": "is a symbolic link",
        "dirlink/f.bin": "its folder dirlink is a symbolic link",
        "pipe": "FIFO",
        "a": "a folder, not a regular file",
        "a/../link.bin": "has an empty, '.' or '..' part",
        "a/./f.bin": "has an empty, '.' or '..' part",
        "a//f.bin": "has an empty, '.' or '..' part",
        "/etc/hostname": "is absolute",
        "a/f.bin/x": "a/f.bin is not a regular file",
        "": "not a non-empty string",
    }
    for rel, why in refusals.items():
        with pytest.raises(CheckpointError, match="refused") as err:
            read_inside(root, rel, limit=1 << 20)
        assert why in str(err.value), (rel, str(err.value))
    with pytest.raises(CheckpointError, match="more than the 3"):
        read_inside(root, "a/f.bin", limit=3)
    with pytest.raises(FileNotFoundError):
        read_inside(root, "a/missing.bin", limit=10)


# ------------------------------------------------------------------ links inside a checkpoint
def _link_file(ckpt: Path, tmp_path: Path, rel: str) -> None:
    target = _outside_copy(ckpt / rel, tmp_path)
    (ckpt / rel).unlink() if (ckpt / rel).is_file() else shutil.rmtree(ckpt / rel)
    (ckpt / rel).symlink_to(target)


LINKS = {
    "weights": (MODEL, f"{MODEL}: refused: is a symbolic link"),
    "manifest": ("MANIFEST.json", "MANIFEST.json: refused: is a symbolic link"),
    "optimizer folder": ("optim", "its folder optim is a symbolic link"),
    "rng folder": ("rng", "its folder rng is a symbolic link"),
    "trainer state": ("trainer_state.json", "trainer_state.json: refused: is a symbolic link"),
}


@pytest.mark.parametrize("case", sorted(LINKS))
def test_a_link_to_an_identical_file_is_refused(two, ckpt_dir, tmp_path, case):
    rel, message = LINKS[case]
    _link_file(ckpt_dir / NEW, tmp_path, rel)  # same bytes: every hash still matches
    with pytest.raises(CheckpointError) as err:
        two.load(20)
    assert NEW in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("case", sorted(LINKS))
def test_load_latest_falls_back_over_a_link(two, ckpt_dir, tmp_path, setup_factory, caplog, case):
    rel, message = LINKS[case]
    _link_file(ckpt_dir / NEW, tmp_path, rel)
    _falls_back(ckpt_dir, setup_factory, caplog, names=(message,))
    assert (tmp_path / "elsewhere").exists()  # the link's target is never touched


def test_a_linked_checkpoint_folder_outside_the_save_dir_is_refused(
    two, ckpt_dir, tmp_path, setup_factory, caplog
):
    target = tmp_path / "elsewhere" / NEW
    target.parent.mkdir()
    (ckpt_dir / NEW).rename(target)
    (ckpt_dir / NEW).symlink_to(target)
    with pytest.raises(CheckpointError, match=r"refused: the checkpoint folder is a symbolic"):
        two.load(20)
    assert [i.step for i in two.list_checkpoints()] == [10]  # never ranked nor deleted
    _falls_back(ckpt_dir, setup_factory, caplog, names=("symbolic link", str(target)))
    assert (target / "MANIFEST.json").is_file()  # moved aside is the link, not its target


def test_a_linked_checkpoint_folder_inside_the_save_dir_is_refused(
    two, ckpt_dir, setup_factory, caplog
):
    (ckpt_dir / "step-000000030").symlink_to(OLD)  # a second name for step 10
    with pytest.raises(CheckpointError, match=r"step-000000030: refused"):
        two.load(30)
    _falls_back(ckpt_dir, setup_factory, caplog, bad="step-000000030", to=20)
    assert (ckpt_dir / OLD / "MANIFEST.json").is_file()


def test_a_folder_path_given_explicitly_is_taken_as_given(two, ckpt_dir, tmp_path):
    link = tmp_path / "my-checkpoint"
    link.symlink_to(ckpt_dir / NEW)  # the caller chose this path: it is followed
    assert two.load(link).step == 20


# ------------------------------------------------------------------ paths that leave the folder
ESCAPES = ["a/../../x.bin", "../x.bin", "model/../../x.bin", "ABS", "model//model.safetensors"]


def _list_escape(ckpt: Path, tmp_path: Path, rel: str, resign) -> str:
    outside = tmp_path / "x.bin"
    outside.write_bytes(b"outside")
    rel = str(outside) if rel == "ABS" else rel
    digest = hashlib.sha256(b"outside").hexdigest()
    resign(ckpt, lambda doc: doc["files"].update({rel: {"size": 7, "sha256": digest}}))
    return rel


@pytest.mark.parametrize("rel", ESCAPES)
def test_a_manifest_path_out_of_the_folder_is_refused(two, ckpt_dir, tmp_path, resign, rel):
    rel = _list_escape(ckpt_dir / NEW, tmp_path, rel, resign)
    with pytest.raises(CheckpointError, match="lists an invalid file path") as err:
        two.load(20)
    assert repr(rel) in str(err.value) and "MANIFEST.json" in str(err.value)


@pytest.mark.parametrize("rel", ESCAPES[:2])
def test_load_latest_falls_back_over_an_escaping_path(
    two, ckpt_dir, tmp_path, setup_factory, caplog, resign, rel
):
    rel = _list_escape(ckpt_dir / NEW, tmp_path, rel, resign)
    _falls_back(ckpt_dir, setup_factory, caplog, names=(repr(rel),))


# ------------------------------------------------------------------ not regular files
def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("{}")


SPECIAL = {
    "fifo rng": ("rng/rank-00000.json", _fifo, "it is a FIFO (named pipe), not a regular file"),
    "fifo weights": (MODEL, _fifo, "it is a FIFO (named pipe), not a regular file"),
    "folder trainer state": ("trainer_state.json", _folder, "it is a folder"),
    "folder optimizer": ("optim/optimizer.pt", _folder, "it is a folder"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_a_fifo_or_folder_instead_of_a_file_is_refused_without_hanging(
    two, ckpt_dir, setup_factory, caplog, case
):
    rel, make, why = SPECIAL[case]
    make(ckpt_dir / NEW / rel)
    with pytest.raises(CheckpointError) as err:
        two.load(20)
    assert f"{NEW}/{rel}: refused: {why}" in str(err.value)
    _falls_back(ckpt_dir, setup_factory, caplog, names=(rel, why))


@pytest.mark.timeout(60)
def test_a_fifo_manifest_is_no_checkpoint_and_never_read(two, ckpt_dir, setup_factory):
    _fifo(ckpt_dir / NEW / "MANIFEST.json")
    with pytest.raises(CheckpointError, match=r"MANIFEST.json: refused: it is a FIFO"):
        two.load(20)
    loaded = CheckpointManager(save_dir=ckpt_dir).load_latest(model=setup_factory(1).model)
    assert loaded is not None and loaded.step == 10


# ------------------------------------------------------------------ DCP checkpoints
STRATEGY = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))


def _trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.fixture
def sharded(ckpt_dir):
    """Two DCP checkpoints (steps 1 and 2) written in one process; returns the manager."""
    manager = CheckpointManager(save_dir=ckpt_dir, payload=ShardedStatePayload(STRATEGY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in (1, 2):
            manager.save(step, dict(zip(("model", "optimizer"), _trained(step), strict=True)))
    return manager


def _rewrite_metadata(ckpt: Path, resign, change) -> None:
    """Change the unpickled ``model/.metadata`` of ``ckpt`` and re-sign the manifest."""
    path = ckpt / "model" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))
    resign(ckpt)


def _store_in(rel: str):
    def change(metadata) -> None:
        for info in metadata.storage_data.values():
            info.relative_path = rel

    return change


def _load_sharded(manager, name):
    model, opt = _trained(9)
    return manager.load(name, model=model, optimizer=opt)


@pytest.mark.parametrize("rel", ["../../elsewhere/__0_0.distcp", "ABS", "sub/../__0_0.distcp"])
def test_dcp_chunks_stored_outside_the_folder_are_refused(
    sharded, ckpt_dir, tmp_path, setup_factory, caplog, resign, rel
):
    ckpt = ckpt_dir / "step-000000002"
    copy = _outside_copy(ckpt / "model" / "__0_0.distcp", tmp_path)  # a naive reader succeeds
    rel = str(copy) if rel == "ABS" else rel
    _rewrite_metadata(ckpt, resign, _store_in(rel))
    with pytest.raises(CheckpointError) as err:
        _load_sharded(sharded, 2)
    assert "model/.metadata: refused" in str(err.value) and repr(rel) in str(err.value)
    with pytest.raises(CheckpointError, match="refused"):
        read_dcp_tensors(ckpt / "model")
    model, opt = _trained(9)
    with caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"):
        loaded = CheckpointManager(
            save_dir=ckpt_dir, payload=ShardedStatePayload(STRATEGY)
        ).load_latest(model=model, optimizer=opt)
    assert loaded is not None and loaded.step == 1
    assert "CHECKPOINT step-000000002 IS CORRUPT" in caplog.text and repr(rel) in caplog.text
    assert torch.equal(model[0].weight, _trained(1)[0][0].weight)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300))


def _a_list(path: Path) -> None:
    path.write_bytes(pickle.dumps([1, 2, 3]))


def _code(path: Path) -> None:
    path.write_bytes(pickle.dumps(print))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


GARBLED = {
    "truncated": (_truncate, "truncated or garbled"),
    "garbage": (_garbage, "model/.metadata: not a valid DCP metadata file"),
    "a list": (_a_list, "holds a list, not DCP's Metadata"),
    "code": (_code, "refers to builtins.print"),
    "empty": (_empty, "truncated or garbled"),
}


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_dcp_metadata_is_corrupt_not_a_traceback(sharded, ckpt_dir, caplog, resign, case):
    damage, message = GARBLED[case]
    ckpt = ckpt_dir / "step-000000002"
    damage(ckpt / "model" / ".metadata")
    resign(ckpt)
    with pytest.raises(CheckpointError) as err:
        _load_sharded(sharded, 2)
    assert message in str(err.value)
    with pytest.raises(CheckpointError):
        read_dcp_tensors(ckpt / "model")
    model, opt = _trained(9)
    with caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"):
        loaded = CheckpointManager(
            save_dir=ckpt_dir, payload=ShardedStatePayload(STRATEGY)
        ).load_latest(model=model, optimizer=opt)
    assert loaded is not None and loaded.step == 1 and message in caplog.text


def test_a_dcp_chunk_past_the_end_of_its_file_is_corrupt(sharded, ckpt_dir, resign):
    def grow(metadata) -> None:
        info = next(iter(metadata.storage_data.values()))
        info.length += 10**9

    _rewrite_metadata(ckpt_dir / "step-000000002", resign, grow)
    with pytest.raises(CheckpointError, match=r"a chunk ends at byte \d+ of __0_0.distcp"):
        _load_sharded(sharded, 2)


def test_a_dcp_tensor_bigger_than_its_shards_is_refused_before_allocating(ckpt_dir, resign):
    folder = ckpt_dir / "dcp"
    from apt.trainops.checkpoints.dcp import write_dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dcp({"w": torch.ones(3, 3)}, folder)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.state_dict_metadata["w"].size = torch.Size([10**6, 10**6])  # 4 TB of float32
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"describes \d+ bytes of tensors, but its shard"):
        read_dcp_tensors(folder)
    assert json.dumps(sorted(p.name for p in folder.iterdir()))  # nothing else was written
