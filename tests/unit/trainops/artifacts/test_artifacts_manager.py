"""The seed-compatible methods of ArtifactManager, each on its own: no lock, no Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from apt.trainops.artifacts import ArtifactManager


def test_save_metrics_alone_appends_strict_json(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="x")
    manager.save_metrics({"train_loss": 2.5, "lr": 1e-3}, step=1)
    manager.save_metrics({"val_loss": 2.25})  # the seed's default step
    numeric_likes = {"tokens": torch.tensor(7.0), "epoch": np.float32(1.5), "ok": True}
    manager.save_metrics(numeric_likes, 2)  # type: ignore[arg-type]
    manager.close()
    lines = (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {"step": 1, "train_loss": 2.5, "lr": 1e-3},
        {"step": 0, "val_loss": 2.25},
        {"step": 2, "tokens": 7.0, "epoch": 1.5, "ok": True},
    ]
    assert manager.read_metrics() == records


@pytest.mark.parametrize("value", ["https://u:pw@h", b"raw", [1.0, 2.0], {"a": 1}, object()])
def test_metrics_hold_numbers_only(tmp_path: Path, value: object) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="x")
    with pytest.raises(TypeError, match=r"metric 'note': metrics\.jsonl holds numbers only"):
        manager.log_metrics({"loss": 1.0, "note": value}, step=1)  # type: ignore[dict-item]
    manager.close()
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # nothing half-written


def test_save_config_alone_writes_config_and_provenance(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="x")
    config = {"model": {"hidden_size": 64, "pad_token_id": 0}, "data": {"tokenizer": "byte"}}
    manager.save_config(config, {"model.hidden_size": "profiles/cpu/tiny.yaml:3"})
    run = tmp_path / "x"
    assert yaml.safe_load((run / "config.yaml").read_text()) == config  # nothing to hide
    assert json.loads((run / "provenance.json").read_text()) == {
        "model.hidden_size": "profiles/cpu/tiny.yaml:3"
    }
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "provenance.json"]


def test_save_model_alone_writes_safetensors(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="x")
    model = nn.Linear(3, 2)
    path = manager.save_model(model, "final_model")
    assert path == tmp_path / "x" / "final_model"
    weights = load_file(str(path / "model.safetensors"))
    assert torch.equal(weights["weight"], model.weight.detach())


def test_save_logs_alone_writes_into_logs(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="x")
    manager.save_logs(["started", "done"])
    assert (tmp_path / "x" / "logs" / "train.log").read_text() == "started\ndone\n"
    assert not (tmp_path / "x" / "train.log").exists()


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    manager = ArtifactManager(output_dir=tmp_path, experiment_name="x", is_main=False)
    manager.save_metrics({"loss": 1.0}, 1)
    manager.save_config({"a": 1}, {"a": "x"})
    manager.save_logs(["x"])
    manager.save_model(nn.Linear(1, 1))
    manager.save_environment()
    manager.attach_log_file()
    manager.save_plots()
    manager.close()
    assert list(tmp_path.iterdir()) == []
