"""ArtifactManager.save_model(model, name=...): into the local model store, with a card made
from what the run folder holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.config import ModelConfig
from apt.core.errors import ModelStoreError
from apt.model import APTLargeModel, APTModel
from apt.trainops.artifacts import ArtifactManager


def _model() -> APTModel:
    torch.manual_seed(0)
    return APTModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2))


def _run(tmp_path: Path) -> ArtifactManager:
    """A run folder with a config and three steps of metrics."""
    manager = ArtifactManager(output_dir=tmp_path / "runs", experiment_name="x")
    manager.save_config({"data": {"source": "files", "train_files": ["a.txt", "b.txt"]}})
    manager.log_metrics({"train_loss": 3.0, "tokens_per_second": 1e4, "lr": 1e-3}, step=1)
    manager.log_metrics({"val_loss": 2.5, "checkpoint_save_seconds": 0.1}, step=2)
    manager.log_metrics({"train_loss": 2.0}, step=3)
    return manager


def test_save_model_by_name_writes_the_store_only(tmp_path: Path) -> None:
    manager, model, store = _run(tmp_path), _model(), tmp_path / "store"
    path = manager.save_model(model, name="m", store=store, step=2)
    manager.close()
    assert path == store / "m"
    assert not (manager.run_dir / "final_model").exists()
    card = json.loads((path / "model_card.json").read_text())
    assert card["steps"] == 2
    # The last value of each metric up to step 2, without the machine's speed.
    assert card["final_metrics"] == {"train_loss": 3.0, "lr": 1e-3, "val_loss": 2.5}
    assert card["data"] == "files: a.txt, b.txt"
    assert card["run"] == card["source"] == str(manager.run_dir.absolute())
    loaded = APTLargeModel.from_pretrained("m", store=store)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_save_model_without_a_step_takes_the_runs_last(tmp_path: Path) -> None:
    manager = _run(tmp_path)
    path = manager.save_model(_model(), "final_model", name="m", store=tmp_path / "store")
    manager.close()
    assert (manager.run_dir / "final_model" / "model.safetensors").is_file()  # both written
    card = json.loads((path / "model_card.json").read_text())
    assert card["steps"] == 3 and card["final_metrics"]["train_loss"] == 2.0


def test_save_model_by_name_refuses_what_the_store_cannot_hold(tmp_path: Path) -> None:
    manager, store = _run(tmp_path), tmp_path / "store"
    manager.save_model(_model(), name="m", store=store)
    with pytest.raises(ModelStoreError, match="holds 'm' already"):
        manager.save_model(_model(), name="m", store=store)
    manager.save_model(_model(), name="m", store=store, overwrite=True)
    with pytest.raises(ModelStoreError, match="cannot store a Linear"):
        manager.save_model(nn.Linear(1, 1), name="lin", store=store)
    with pytest.raises(ModelStoreError, match="is not a model name"):
        manager.save_model(_model(), name="../m", store=store)
    manager.close()
    assert sorted(p.name for p in store.iterdir()) == ["m"]


def test_other_ranks_store_nothing_but_check_the_name(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path / "runs", experiment_name="x", is_main=False)
    store = tmp_path / "store"
    assert manager.save_model(_model(), name="m", store=store) == store / "m"
    with pytest.raises(ModelStoreError, match="is not a model name"):
        manager.save_model(_model(), name="a/b", store=store)
    assert list(tmp_path.iterdir()) == []
