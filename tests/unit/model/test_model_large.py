"""APTLargeModel: built from keyword sizes, a preset or a config."""

from __future__ import annotations

import pytest

from apt.core.config import ModelConfig
from apt.core.errors import ConfigError
from apt.model import APTLargeModel, APTModel


def test_keyword_sizes() -> None:
    model = APTLargeModel(hidden_size=128, num_layers=2, vocab_size=512, num_kv_heads=1)
    assert isinstance(model, APTModel)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (128, 2, 512)
    assert cfg.num_heads == 2  # 64-wide heads when only hidden_size is given
    assert model.blocks[0].attn.k_proj.weight.shape == (64, 128)


def test_preset_and_config() -> None:
    model = APTLargeModel(preset="tiny", num_layers=1, max_seq_len=32)
    assert (model.config.hidden_size, model.config.num_heads) == (128, 4)
    cfg = ModelConfig(hidden_size=64, num_layers=1)
    assert APTLargeModel(cfg).config == cfg
    assert APTLargeModel(config=cfg).config == cfg
    assert APTLargeModel(cfg, num_layers=2).config.num_layers == 2
    assert APTLargeModel().config == ModelConfig()


def test_bad_sizes_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="hidden_sise"):
        APTLargeModel(hidden_sise=64)
    with pytest.raises(ConfigError, match="divisible"):
        APTLargeModel(hidden_size=96, num_heads=5)


def test_moe_every_n_layers_must_fit() -> None:
    with pytest.raises(ValueError, match="every_n_layers"):
        ModelConfig(num_layers=2, moe={"every_n_layers": 3})
