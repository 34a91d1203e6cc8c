"""from_pretrained on hostile folders: deep or huge configs, absurd sizes, FIFOs, NaN weights.

Every refusal is a CheckpointError naming the file (and the field), raised before the model or
its weights are allocated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from apt.core.config import ModelConfig
from apt.core.errors import CheckpointError
from apt.model import APTModel
from apt.model.architectures import pretrained
from apt.model.architectures.pretrained import CONFIG_MAX_BYTES, config_parameters

Factory = Callable[..., APTModel]


class NeverBuilt(APTModel):
    """Fails the test if a refused folder gets as far as building the model."""

    def __init__(self, config: ModelConfig) -> None:
        raise AssertionError(f"the model was built for {config}")


@pytest.fixture
def folder(tiny_model: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real saved tiny model; reading its weights fails the test (refusals come first)."""
    tiny_model().save_pretrained(tmp_path)

    def no_weights(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read")

    monkeypatch.setattr(pretrained, "load_file", no_weights)
    return tmp_path


def _config(folder: Path, **changes: object) -> None:
    doc = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**doc, **changes}))


def _refused(folder: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as err:
        NeverBuilt.from_pretrained(folder)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


# ------------------------------------------------------------------ config.json itself
@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"hidden_size": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"moe": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001,
    ],
    ids=["a deep list", "a deep field", "deep objects"],
)
def test_a_config_nested_100000_deep_is_refused(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)
    _refused(folder, "config.json is not a valid model config (nested too deeply")


def test_a_config_over_the_size_cap_is_refused_unread(folder: Path) -> None:
    doc = (folder / "config.json").read_text()
    (folder / "config.json").write_text(doc + " " * CONFIG_MAX_BYTES)
    _refused(folder, "config.json is", f"limit {CONFIG_MAX_BYTES} bytes")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_fifo_or_folder_instead_of_a_file_is_refused(folder: Path, name: str, kind: str) -> None:
    (folder / name).unlink()
    os.mkfifo(folder / name) if kind == "fifo" else (folder / name).mkdir()
    _refused(folder, f"{name} is not a regular file")


# ------------------------------------------------------------------ absurd sizes
ABSURD = {
    "a wide model": ({"hidden_size": 10**6, "num_heads": 4}, "hidden_size=1000000"),
    "a deep model": ({"num_layers": 10**5}, "num_layers=100000"),
    "a huge vocabulary": ({"vocab_size": 10**9}, "vocab_size=1000000000"),
    "a terabyte model": (
        {"hidden_size": 10**6, "num_heads": 4, "num_layers": 10**5, "vocab_size": 10**9},
        "num_layers=100000",
    ),
    "a huge MLP": ({"intermediate_size": 10**9}, "intermediate_size=1000000000"),
    "many experts": ({"moe": {"num_experts": 10**6}}, "moe.num_experts=1000000"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_a_config_the_weights_cannot_fill_is_refused_before_allocating(
    folder: Path, case: str
) -> None:
    changes, field = ABSURD[case]
    _config(folder, **changes)
    message = _refused(folder, "config.json: describes a model of", field, "Nothing was allocated")
    claimed = config_parameters(
        ModelConfig.model_validate(json.loads((folder / "config.json").read_text()))
    )
    assert f"{claimed:,} parameters" in message
    assert "model.safetensors holds only 123,200 values" in message  # the tiny model's count


def test_rope_tables_over_the_limit_are_refused(folder: Path) -> None:
    _config(folder, max_seq_len=10**9)
    _refused(folder, "config.json: max_seq_len=1000000000 x head size 16", "over the limit")


def test_a_weights_header_that_lies_about_its_length_is_corrupt(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    _refused(folder, "model.safetensors is corrupt or truncated")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False, "num_kv_heads": 2},
        {"moe": {"num_experts": 4, "every_n_layers": 2}, "num_layers": 3},
        {"intermediate_size": 100, "num_heads": 2},
    ],
    ids=["tied", "untied-gqa", "moe-every-2", "odd-mlp"],
)
def test_the_parameter_estimate_is_the_models_count(overrides: dict) -> None:
    config = ModelConfig.model_validate(
        {"vocab_size": 96, "hidden_size": 32, "num_layers": 2, "num_heads": 4, **overrides}
    )
    assert config_parameters(config) == APTModel(config).num_parameters()


# ------------------------------------------------------------------ what is loaded anyway
def test_links_are_followed_as_a_hub_cache_makes_them(tiny_model: Factory, tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path / "blobs")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(tmp_path / "blobs" / name)
    loaded = APTModel.from_pretrained(snapshot)
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)


def test_non_finite_weights_load_with_a_warning_naming_them(
    tiny_model: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.blocks[0].attn.q_proj.weight[0, 0] = math.nan
        model.norm.weight[3] = math.inf
    model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="apt.model"):
        loaded = APTModel.from_pretrained(tmp_path)
    assert torch.isnan(loaded.blocks[0].attn.q_proj.weight[0, 0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        stored = len(list(fh.keys()))
    assert f"2 of {stored} tensors hold NaN or infinite values" in warnings[0]
    assert "blocks.0.attn.q_proj.weight" in warnings[0] and "norm.weight" in warnings[0]
    assert "model.safetensors" in warnings[0]


def test_finite_weights_load_without_a_warning(
    tiny_model: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_model().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="apt.model"):
        APTModel.from_pretrained(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
