"""``train_model``: the 1.x entry point, running the 2.0 engine."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from apt.core.config import APTConfig
from apt.core.errors import ConfigError
from apt.model import APTModel
from apt.trainops.data import ByteTokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from apt_model.training.callbacks import TrainingCallback
    from apt_model.training.trainer import train_model


class Steps(TrainingCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.epochs: list[int] = []

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        self.epochs.append(epoch)

    def on_step(self, step: int, **kwargs: Any) -> None:
        self.steps.append(step)


def loader() -> DataLoader[Any]:
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (12, 9))
    return DataLoader([(r[:-1], r[1:]) for r in ids], batch_size=2, shuffle=False)


def test_train_model_with_your_own_model_and_loader(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    steps = Steps()
    trained, tokenizer, cfg = train_model(
        epochs=2,
        learning_rate=0.01,
        save_path=tmp_path / "legacy_run",
        model=model,
        dataloader=loader(),
        callbacks=[steps],
        accumulation_steps=3,
    )
    assert trained is model and tokenizer is None and isinstance(cfg, APTConfig)
    assert (cfg.training.num_epochs, cfg.training.gradient_accumulation_steps) == (2, 3)
    assert steps.epochs == [0, 1] and steps.steps == [1, 2, 3, 4]  # 6 batches / 3 per step
    assert (tmp_path / "legacy_run" / "final_model" / "model.safetensors").is_file()


def test_train_model_from_a_1x_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    profile = tmp_path / "legacy.yaml"
    profile.write_text(
        "plugins: [voter]\n"
        "model: {hidden_size: 32, num_layers: 1, num_heads: 2, max_seq_len: 32,\n"
        "        ffn_name: default}\n"
        "data: {source: python_stdlib, seq_len: 32, max_corpus_bytes: 20000}\n"
        "training: {batch_size: 4, device: cpu}\n"
        "eval: {max_batches: 1}\n"
        "monitoring: {progress_bar: false}\n",
        encoding="utf-8",
    )
    trained, tokenizer, cfg = train_model(config=profile, max_steps=2, save_path="runs/legacy")
    assert isinstance(trained, APTModel) and trained.voter is not None and trained.voter.enabled
    assert isinstance(tokenizer, ByteTokenizer) and cfg.training.max_steps == 2
    assert (tmp_path / "runs" / "legacy" / "final_model").is_dir()


def test_1x_keywords_apt_2_replaced_say_what_replaces_them() -> None:
    with pytest.raises(ConfigError) as err:
        train_model(epochs=1, texts=["hello"], early_stopping_patience=3, epoch=2)
    message = str(err.value)
    assert "texts: removed in APT 2.0; use data.source in the config" in message
    assert (
        "early_stopping_patience: removed in APT 2.0; use callbacks: [{name: early_stopping"
        in message
    )
    assert "epoch: unknown keyword (did you mean 'epochs'?)" in message


def test_a_callback_that_is_not_one_is_refused() -> None:
    class Duck:
        def on_step(self, step: int) -> None: ...

    with pytest.raises(ConfigError, match=r"callbacks\[0\] \(Duck\) is not a callback; derive"):
        train_model(epochs=1, callbacks=[Duck()])  # type: ignore[list-item]
