"""save_pretrained / from_pretrained: bit-exact round trips and clear errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt.core.errors import CheckpointError
from apt.model import APTLargeModel, APTModel

Factory = Callable[..., APTModel]


def _assert_same(a: APTModel, b: APTModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    x = torch.randint(0, a.config.vocab_size, (2, 9))
    a.eval(), b.eval()
    assert torch.equal(a(x, x).loss, b(x, x).loss)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False, "num_kv_heads": 2},
        {"moe": {"num_experts": 4}, "align": {}, "voter": {}},
    ],
    ids=["tied", "untied-gqa", "all-modules"],
)
def test_round_trip_is_bit_exact(tiny_model: Factory, tmp_path: Path, overrides: dict) -> None:
    model = tiny_model(**overrides)
    for group in model.controllable_modules().values():
        group.enable()
    if model.controllable_modules():
        model.set_scheduled("router.temperature", 0.75)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == model.config.model_dump(
        mode="json"
    )
    loaded = APTModel.from_pretrained(tmp_path)
    _assert_same(model, loaded)
    assert loaded.config == model.config
    for name, group in model.controllable_modules().items():
        assert loaded.controllable_modules()[name].enabled == group.enabled
    if model.controllable_modules():
        assert loaded.get_scheduled("router.temperature") == 0.75


def test_tied_weights_are_stored_once_and_stay_tied(tiny_model: Factory, tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "embed_tokens.weight" in stored and "lm_head.weight" not in stored
    loaded = APTModel.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_large_model_loads_as_large_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = APTLargeModel(hidden_size=64, num_layers=2, max_seq_len=32)
    model.save_pretrained(tmp_path)
    loaded = APTLargeModel.from_pretrained(tmp_path)
    assert type(loaded) is APTLargeModel
    _assert_same(model, loaded)


def test_compile_prefix_is_stripped(tiny_model: Factory, tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    stored = load_file(str(weights))
    save_file({f"_orig_mod.{k}": v for k, v in stored.items()}, str(weights))
    _assert_same(model, APTModel.from_pretrained(tmp_path))


def test_missing_folder_and_files(tiny_model: Factory, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="save_pretrained"):
        APTModel.from_pretrained(tmp_path / "nope")
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors not found"):
        APTModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        APTModel.from_pretrained(tmp_path)


def test_corrupt_files(tiny_model: Factory, tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        APTModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not a valid model config"):
        APTModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "bogus": 1}))
    with pytest.raises(CheckpointError, match="bogus"):
        APTModel.from_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config(tiny_model: Factory, tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    other = tmp_path / "other"
    tiny_model(num_layers=3).save_pretrained(other)
    (tmp_path / "model.safetensors").replace(other / "model.safetensors.bak")
    (other / "model.safetensors").replace(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.2\."):
        APTModel.from_pretrained(tmp_path)
