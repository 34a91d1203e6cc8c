"""``training.float8``: which layers FP8 converts, the fallback where it cannot run, and (on an
FP8-capable GPU) a real run whose loss tracks bf16 and whose checkpoints keep their layout."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.config import load_profile
from apt.core.config.model import ModelConfig
from apt.core.errors import ConfigError
from apt.model import APTModel
from apt.trainops.engine import Trainer
from apt.trainops.engine.float8 import apply_float8, float8_candidates, float8_unavailable


def tiny_model(**changes: object) -> APTModel:
    config = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 256, **changes}
    return APTModel(ModelConfig(**config))


def test_the_block_linears_are_candidates_and_the_tied_head_is_not() -> None:
    names = float8_candidates(tiny_model())
    per_block = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"]
    per_block += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"blocks.{i}.{part}" for i in range(2) for part in per_block]


def test_an_untied_head_and_odd_sizes_stay_in_high_precision() -> None:
    model = nn.Sequential()
    model.add_module("inner", nn.Linear(64, 128))
    model.add_module("odd", nn.Linear(128, 30))
    model.add_module("lm_head", nn.Linear(64, 256))
    assert float8_candidates(model) == ["inner"]
    assert "lm_head" not in float8_candidates(tiny_model(tie_embeddings=False))


def test_without_an_fp8_gpu_the_run_says_why_once_and_trains_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="apt"):
        converted = apply_float8(model, "tensorwise", torch.device("cpu"))
    assert converted == []
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())
    warnings = [r.getMessage() for r in caplog.records if "training.float8" in r.getMessage()]
    assert len(warnings) == 1
    assert "training without FP8" in warnings[0]


def test_without_torchao_the_reason_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    reason = float8_unavailable(torch.device("cuda"))
    assert reason is not None and "pip install 'apt-transformer[float8]'" in reason


def test_off_converts_nothing_and_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="apt"):
        assert apply_float8(tiny_model(), "off", torch.device("cpu")) == []
    assert not [r for r in caplog.records if "float8" in r.getMessage()]


def test_float8_needs_bf16() -> None:
    with pytest.raises(ConfigError, match=r"precision: bf16 or float8: off"):
        load_profile("cpu/tiny", overrides=["training.float8=rowwise"])


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and float8_unavailable(torch.device("cuda")) is None


def _run(tmp_path: Path, name: str, float8: str) -> tuple[Trainer, list[float]]:
    cfg = load_profile(
        "cpu/tiny",
        overrides=[
            "model.hidden_size=256",
            "model.num_heads=4",
            "model.max_seq_len=128",
            "data.seq_len=128",
            "data.max_corpus_bytes=400000",
            "training.device=cuda",
            "training.precision=bf16",
            f"training.float8={float8}",
            "training.max_steps=60",
            "training.batch_size=16",
            "training.checkpoints.save_interval=30",
            "eval.interval=null",
            f"artifacts.output_dir={tmp_path}",
            f"artifacts.experiment_name={name}",
        ],
    )
    trainer = Trainer.from_config(cfg)
    trainer.train()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]
    return trainer, losses


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_gpu(), reason="needs torchao and a GPU of compute capability >= 8.9")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_trains_like_bf16_and_keeps_the_checkpoint_layout(tmp_path: Path, recipe: str) -> None:
    bf16, bf16_losses = _run(tmp_path, "bf16", "off")
    fp8, fp8_losses = _run(tmp_path, recipe, recipe)
    assert len(fp8.float8_layers) == 2 * 7  # every block linear, not the tied head
    assert sum(type(m).__name__ == "Float8Linear" for m in fp8.model.modules()) == 14
    assert fp8_losses[-1] < fp8_losses[0] - 1.0  # it learns
    # FP8 rounding (3 mantissa bits, dynamic scales) moves the curve a little, not its course.
    assert abs(fp8_losses[-1] - bf16_losses[-1]) < 0.1 * bf16_losses[-1]
    plain = {k: (v.shape, v.dtype) for k, v in bf16.model.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in fp8.model.state_dict().items()} == plain
