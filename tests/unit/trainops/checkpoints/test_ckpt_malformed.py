"""Checkpoints whose manifest verifies but whose content is malformed, or does not fit.

Every file is re-hashed after the damage (``resign``), so only content checks can catch it:
an explicit load raises CheckpointError naming the file and the field, load_latest warns and
falls back to the previous good checkpoint; nothing is loaded into the objects first.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
from pathlib import Path

import pytest
import torch

from apt.core.errors import CheckpointError, ConfigError
from apt.trainops.checkpoints import CheckpointManager, CheckpointMismatchError
from apt.trainops.checkpoints.safetensors_file import read_safetensors, write_safetensors

MODEL = "model/model.safetensors"
RNG = "rng/rank-00000"
NEW = "step-000000020"


@pytest.fixture
def two(ckpt_dir, setup_factory):
    """Checkpoints of steps 10 and 20 (different weights); returns the manager."""
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=ckpt_dir, keep_last_n=5)
    for step in (10, 20):
        run.train(1)
        manager.save(step, **run.objects(), trainer_state={"train": {"step": step}})
    return manager


def _expect(two, ckpt_dir, setup_factory, caplog, message, error=CheckpointError):
    """Explicit load raises ``error`` with ``message`` and leaves the objects as they were;
    load_latest falls back to step 10 with a warning that says the same."""
    fresh = setup_factory(3)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(error) as err:
        two.load(20, **fresh.objects())
    assert f"{NEW}/" in str(err.value) and message in str(err.value), str(err.value)
    # corrupt and does-not-fit are told apart (only the second depends on the objects)
    assert isinstance(err.value, CheckpointMismatchError) == (error is CheckpointMismatchError)
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    with caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"):
        loaded = CheckpointManager(save_dir=ckpt_dir).load_latest(**fresh.objects())
    assert loaded is not None and loaded.step == 10
    assert loaded.trainer_state == {"train": {"step": 10}}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"CHECKPOINT {NEW} IS CORRUPT" in warning and message in warning
    assert "Falling back to step-000000010" in warning
    assert (ckpt_dir / f".corrupt-{NEW}").is_dir() and not (ckpt_dir / NEW).exists()


# ------------------------------------------------------------------ the manifest
def _drop(rel):
    return lambda doc: doc["files"].pop(rel)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(doc):
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


MANIFESTS = {
    "no files at all": (_set("files", {}), "trainer_state.json: not listed in the manifest"),
    "no weights": (_drop(MODEL), f"{MODEL}: not listed in the manifest"),
    "no trainer state": (_drop("trainer_state.json"), "trainer_state.json: not listed"),
    "no rng tensors": (_drop(f"{RNG}.safetensors"), f"{RNG}.safetensors: not listed"),
    "no optimizer": (_drop("optim/optimizer.pt"), "optim/optimizer.pt: not listed"),
    "a string step": (_set("step", "20"), "step: Input should be a valid integer"),
    "a float step": (_set("step", 20.0), "step: Input should be a valid integer"),
    "a negative step": (_set("step", -20), "step: Input should be greater than or equal to 0"),
    "no sequence": (lambda doc: doc.pop("sequence"), "sequence: Field required"),
    "a boolean sequence": (_set("sequence", True), "sequence: Input should be a valid integer"),
    "a string size": (_set("files", MODEL, "size", "12"), f"files.{MODEL}.size: Input should"),
    "a bad sha256": (_set("files", MODEL, "sha256", "xyz"), f"files.{MODEL}.sha256: String"),
    "files as a list": (_set("files", []), "files: Input should be a valid dictionary"),
    "metrics as a list": (_set("metrics", [1]), "metrics: Input should be a valid dictionary"),
    "an unknown kind": (_set("parts", "model", "kind", "weights"), "parts.model.kind: Input"),
    "a part name that climbs": (
        _set("parts", "../../x", {"kind": "state"}),
        "parts: '../../x' is not a lower_snake_case name",
    ),
    "an optimizer of no module": (
        _set("parts", "optimizer", "module", "nothing"),
        "parts.optimizer.module: 'nothing' is not a module part",
    ),
    "a billion ranks": (_set("world_size", 10**9), "rng/rank-00001.json: not listed"),
    "no parts in version 2": (lambda doc: doc.pop("parts"), "parts: missing"),
}


UNSIGNED = {"a string size", "a bad sha256", "files as a list"}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_malformed_manifest_is_corrupt(two, ckpt_dir, setup_factory, caplog, resign, case):
    edit, message = MANIFESTS[case]
    if case in UNSIGNED:  # the edit is to the records resign would rewrite
        path = ckpt_dir / NEW / "MANIFEST.json"
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    else:
        resign(ckpt_dir / NEW, edit)
    _expect(two, ckpt_dir, setup_factory, caplog, message)


# ------------------------------------------------------------------ JSON files
def _write(rel: str, data: bytes):
    return lambda ckpt: (ckpt / rel).write_bytes(data)


def _edit_json(rel: str, change):
    def damage(ckpt: Path) -> None:
        doc = json.loads((ckpt / rel).read_text())
        change(doc)
        (ckpt / rel).write_text(json.dumps(doc))

    return damage


JSONS = {
    "trainer state a list": (
        _write("trainer_state.json", b"[1, 2]"),
        "trainer_state.json: must be a JSON object, found a list",
    ),
    "trainer state 100,000 deep": (
        _write("trainer_state.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "trainer_state.json: not valid JSON (nested too deeply)",
    ),
    "trainer state not utf-8": (
        _write("trainer_state.json", b'{"a": "\xff"}'),
        "trainer_state.json: not valid JSON",
    ),
    "an empty rng file": (_write(f"{RNG}.json", b""), f"{RNG}.json: not valid JSON"),
    "rng a string": (_write(f"{RNG}.json", b'"x"'), "not an RNG state: not a JSON object"),
    "rng state too short": (
        _edit_json(f"{RNG}.json", lambda d: d["python"][1].pop()),
        "not an RNG state: python[1]: not 624 32-bit words and a position",
    ),
    "rng without numpy": (
        _edit_json(f"{RNG}.json", lambda d: d.pop("numpy")),
        "numpy: missing or not an object",
    ),
    "rng pos a string": (
        _edit_json(f"{RNG}.json", lambda d: d["numpy"].update(pos="3")),
        "numpy.pos: missing or invalid",
    ),
    "rng a word of 33 bits": (
        _edit_json(f"{RNG}.json", lambda d: d["numpy"]["keys"].__setitem__(0, 1 << 32)),
        "numpy.keys: missing or invalid",
    ),
    "rng gauss a string": (
        _edit_json(f"{RNG}.json", lambda d: d["python"].__setitem__(2, "0.5")),
        "python[2]: gauss_next '0.5' is not a float or null",
    ),
}


@pytest.mark.parametrize("case", sorted(JSONS))
def test_malformed_json_content_is_corrupt(two, ckpt_dir, setup_factory, caplog, resign, case):
    damage, message = JSONS[case]
    damage(ckpt_dir / NEW)
    resign(ckpt_dir / NEW)
    _expect(two, ckpt_dir, setup_factory, caplog, message)


# ------------------------------------------------------------------ safetensors headers
def _edit_header(rel: str, change, *, pad: bytes = b""):
    """Rewrite the JSON header of a safetensors file (``change`` edits it in place)."""

    def damage(ckpt: Path) -> None:
        raw = (ckpt / rel).read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        change(header)
        text = json.dumps(header).encode()
        (ckpt / rel).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :] + pad)

    return damage


def _first(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


HEADERS = {
    "a length past the end": (
        _write(MODEL, struct.pack("<Q", 10**12) + b"{}"),
        f"{MODEL}: not a valid safetensors file: header length 1000000000000 exceeds",
    ),
    "shorter than 8 bytes": (_write(MODEL, b"\x01\x02"), "2 bytes, shorter than the 8-byte"),
    "offsets past the end": (
        _edit_header(MODEL, lambda h: _first(h).update(data_offsets=[0, 10**12])),
        "data_offsets span 1000000000000",
    ),
    "a shape bigger than its bytes": (
        _edit_header(MODEL, lambda h: _first(h).update(shape=[10**6, 10**6])),
        "is 4000000000000 bytes, its data_offsets span",
    ),
    "a negative size": (
        _edit_header(MODEL, lambda h: _first(h).update(shape=[-1])),
        "is not a list of sizes >= 0",
    ),
    "an unknown dtype": (
        _edit_header(MODEL, lambda h: _first(h).update(dtype="C64")),
        "dtype 'C64' is not one of",
    ),
    "overlapping tensors": (
        _edit_header(
            MODEL,
            lambda h: [
                rec.update(data_offsets=[0, rec["data_offsets"][1] - rec["data_offsets"][0]])
                for k, rec in h.items()
                if k == "proj.bias"
            ],
        ),
        "(overlap or gap)",
    ),
    "bytes left over": (
        _edit_header(MODEL, lambda h: None, pad=b"\x00" * 8),
        "the data section holds",
    ),
    "a header that is a list": (
        _write(MODEL, struct.pack("<Q", 2) + b"[]"),
        "the header is not a JSON object",
    ),
    "a metadata number": (
        _edit_header(MODEL, lambda h: h.update(__metadata__={"apt_aliases": 3})),
        "__metadata__ must map strings to strings",
    ),
    "an alias to nothing": (
        _edit_header(
            MODEL, lambda h: h.update(__metadata__={"apt_aliases": '{"head.weight": "ghost"}'})
        ),
        "metadata apt_aliases must map new names to stored tensors",
    ),
    "rng tensor of floats": (
        _edit_header(f"{RNG}.safetensors", lambda h: h["torch_cpu"].update(dtype="I8")),
        "torch_cpu: not a uint8 tensor",
    ),
    "an empty rng tensor file": (
        _write(f"{RNG}.safetensors", b""),
        f"{RNG}.safetensors: not a valid safetensors file: 0 bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_safetensors_header_that_lies_is_corrupt(
    two, ckpt_dir, setup_factory, caplog, resign, case
):
    damage, message = HEADERS[case]
    damage(ckpt_dir / NEW)
    resign(ckpt_dir / NEW)
    _expect(two, ckpt_dir, setup_factory, caplog, message)


# ------------------------------------------------------------------ torch structures
class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


STRUCTURES = {
    "a list": ([1, 2], "optim/optimizer.pt: holds a list, not a state dict"),
    "pickled code": ({"state": Evil()}, "optim/optimizer.pt: cannot be read as a state"),
    "a missing tensor": (
        {"state": {0: {"exp_avg": "\x00apt-tensor:state.0.ghost"}}, "param_groups": []},
        "refers to tensors ['state.0.ghost'] that optim/optimizer.safetensors lacks",
    ),
    "no param groups": (
        {"state": {}, "param_groups": "x"},
        "optim/optimizer.pt: not an optimizer state",
    ),
    "indices out of range": (
        {"state": {}, "param_groups": [{"params": [0, 1, 7]}]},
        "its parameters must be the indices 0..2 or parameter names",
    ),
    "a state of no group": (
        {"state": {9: {}}, "param_groups": [{"params": [0, 1, 2]}]},
        "'state' holds parameters that no parameter group lists",
    ),
    "names of another model": (
        {"state": {}, "param_groups": [{"params": ["a.weight", "b", "c"]}]},
        "updates parameters ['a.weight', 'b', 'c'] that the model does not have",
    ),
}
MISFIT_STRUCTURES = {"names of another model"}


@pytest.mark.parametrize("case", sorted(STRUCTURES))
def test_a_malformed_optimizer_structure_is_corrupt(
    two, ckpt_dir, setup_factory, caplog, resign, case
):
    value, message = STRUCTURES[case]
    path = ckpt_dir / NEW / "optim/optimizer.pt"
    if isinstance(value, dict) and isinstance(value.get("state"), Evil):
        path.write_bytes(pickle.dumps(value, protocol=2))
    else:
        torch.save(value, path)
    resign(ckpt_dir / NEW)
    error = CheckpointMismatchError if case in MISFIT_STRUCTURES else CheckpointError
    _expect(two, ckpt_dir, setup_factory, caplog, message, error=error)


def test_garbage_in_a_state_part_is_corrupt(two, ckpt_dir, setup_factory, caplog, resign):
    (ckpt_dir / NEW / "parts/lr_scheduler/state.pt").write_bytes(b"\x80\x02garbage")
    resign(ckpt_dir / NEW)
    _expect(two, ckpt_dir, setup_factory, caplog, "parts/lr_scheduler/state.pt: cannot be read")


# ------------------------------------------------------------------ content that does not fit
def _rewrite_tensors(ckpt: Path, change) -> None:
    tensors, meta = read_safetensors(ckpt / MODEL, "cpu")
    change(tensors)
    with open(ckpt / MODEL, "wb") as fh:
        write_safetensors(fh.write, tensors, meta)


MISFITS = {
    "a wrong shape": (
        lambda t: t.update({"proj.weight": torch.zeros(4, 8)}),
        "proj.weight (4, 8) torch.float32 vs (8, 8) torch.float32",
    ),
    "a wrong dtype": (
        lambda t: t.update({"proj.bias": t["proj.bias"].double()}),
        "proj.bias (8,) torch.float64 vs (8,) torch.float32",
    ),
    "an int tensor": (
        lambda t: t.update({"proj.bias": t["proj.bias"].long()}),
        "proj.bias (8,) torch.int64 vs (8,) torch.float32",
    ),
    "a missing tensor": (lambda t: t.pop("proj.bias"), "missing ['proj.bias']"),
    "an extra tensor": (
        lambda t: t.update({"extra.weight": torch.zeros(2)}),
        "unexpected ['extra.weight'], other shape or dtype (saved vs given) []. It holds more "
        "tensors than the module: to load part of a whole model",
    ),
}


@pytest.mark.parametrize("case", sorted(MISFITS))
def test_a_tensor_that_does_not_fit_the_model_falls_back(
    two, ckpt_dir, setup_factory, caplog, resign, case
):
    change, message = MISFITS[case]
    _rewrite_tensors(ckpt_dir / NEW, change)
    resign(ckpt_dir / NEW)
    _expect(two, ckpt_dir, setup_factory, caplog, message, error=CheckpointMismatchError)


def test_when_no_checkpoint_fits_load_latest_raises_and_moves_nothing(two, ckpt_dir, caplog):
    other = torch.nn.Linear(3, 3)  # another model: every checkpoint misfits
    with pytest.raises(CheckpointMismatchError, match=r"no checkpoint .* fits the objects"):
        CheckpointManager(save_dir=ckpt_dir).load_latest(model=other)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["LATEST", "step-000000010", NEW]


def test_an_optimizer_of_other_groups_does_not_fit(two, ckpt_dir, setup_factory):
    fresh = setup_factory(3)
    params = list(fresh.model.parameters())
    split = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}])
    with pytest.raises(CheckpointMismatchError, match=r"parameter groups of \[3\] .* \[1, 2\]"):
        two.load(20, model=fresh.model, optimizer=split)


def test_before_load_can_reject_a_checkpoint_as_corrupt(two, ckpt_dir, setup_factory, caplog):
    def check(state, path):
        if state["train"]["step"] == 20:
            raise CheckpointError(f"{path}/trainer_state.json: train.step is not what I expect")

    with caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"):
        loaded = CheckpointManager(save_dir=ckpt_dir).load_latest(
            model=setup_factory(1).model, before_load=check
        )
    assert loaded is not None and loaded.step == 10
    assert "train.step is not what I expect" in caplog.text


def test_before_load_config_errors_still_propagate(two, ckpt_dir, caplog):
    def drift(state, path):
        raise ConfigError("the config changed")

    with pytest.raises(ConfigError, match="the config changed"):
        CheckpointManager(save_dir=ckpt_dir).load_latest(before_load=drift)
    assert (ckpt_dir / NEW).is_dir()
    (ckpt_dir / NEW / "trainer_state.json").write_text("[]")  # not re-signed: a bad hash
    with (
        caplog.at_level(logging.WARNING, logger="apt.trainops.checkpoints"),
        pytest.raises(ConfigError, match="the config changed"),
    ):
        CheckpointManager(save_dir=ckpt_dir).load_latest(before_load=drift)  # raised for 10
    assert f"CHECKPOINT {NEW} IS CORRUPT" in caplog.text and "expected size" in caplog.text
    assert (ckpt_dir / f".corrupt-{NEW}").is_dir()
