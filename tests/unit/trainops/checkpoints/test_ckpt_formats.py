"""The streamed safetensors files read back with the official loader; the fault hook parses."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load_file

from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.faults import fault_armed
from apt.trainops.checkpoints.safetensors_file import read_safetensors, write_safetensors
from apt.trainops.checkpoints.tensorio import SnapshotBuffers, clean_state_names, snapshot


def _write(path, tensors, meta=None):
    buf = io.BytesIO()
    write_safetensors(buf.write, tensors, meta or {})
    path.write_bytes(buf.getvalue())


def test_dtypes_shapes_and_layouts_round_trip(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(4).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        "slice": base[1:, 2:],
    }
    path = tmp_path / "t.safetensors"
    _write(path, tensors, {"note": "x"})
    official = load_file(str(path))
    assert official.keys() == tensors.keys()
    for name, t in tensors.items():
        assert official[name].dtype == t.dtype and torch.equal(official[name], t), name


def test_exact_aliases_stored_once_views_stored_apart(tmp_path):
    w = torch.randn(4, 4)
    tensors = {"a": w, "b": w.detach(), "c": w[:2]}  # b aliases a exactly; c is a view
    path = tmp_path / "t.safetensors"
    _write(path, tensors)
    assert set(load_file(str(path))) == {"a", "c"}
    back, meta = read_safetensors(path, device="cpu")
    assert set(back) == {"a", "b", "c"} and meta == {}
    assert back["b"] is back["a"] and torch.equal(back["c"], w[:2])


def test_clean_names():
    state = {"_orig_mod.blocks.0._orig_mod.w": 1, "_orig_mod.module_list.0.b": 2}
    assert clean_state_names(state) == {"blocks.0.w": 1, "module_list.0.b": 2}
    with pytest.raises(CheckpointError, match="both clean to"):
        clean_state_names({"_orig_mod.w": 1, "w": 2})


def test_snapshot_copies_into_reused_buffers():
    state = {
        "w": torch.ones(3),
        "nested": [{"m": torch.zeros(2)}, 4, "s", None],
        "betas": (0.9, 0.95),
    }
    buffers = SnapshotBuffers()
    first = snapshot(state, what="x", buffers=buffers)
    state["w"].add_(1)
    assert torch.equal(first["w"], torch.ones(3))  # a copy, not a view
    assert first["nested"][1:] == [4, "s", None] and first["betas"] == (0.9, 0.95)
    second = snapshot(state, what="x", buffers=buffers)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # same buffer, no new allocation
    live = snapshot(state, what="x", buffers=None)
    assert live["w"].data_ptr() == state["w"].data_ptr()  # sync: CPU tensors are not copied


@pytest.mark.parametrize(
    ("spec", "point", "step", "armed"),
    [
        ("kill_before_rename", "kill_before_rename", 5, True),
        ("kill_before_rename@5", "kill_before_rename", 5, True),
        ("kill_before_rename@5", "kill_before_rename", 6, False),
        ("enospc_on_write, kill_before_manifest@2", "kill_before_manifest", 2, True),
        ("", "kill_before_rename", 5, False),
        ("enospc_on_write@5:1", "enospc_on_write", 5, True),  # this process is rank 1
        ("enospc_on_write@5:0", "enospc_on_write", 5, False),
        ("enospc_on_write:1", "enospc_on_write", 9, True),
    ],
)
def test_fault_spec(monkeypatch, spec, point, step, armed):
    monkeypatch.setenv("APT_FAULT_INJECT", spec)
    monkeypatch.setenv("RANK", "1")
    assert fault_armed(point, step) is armed
