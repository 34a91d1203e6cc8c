"""A fine-tuning run's checkpoints as plain models: ``load_trained_model`` rebuilds LoRA
adapters and the align reference to read them, merges the adapters and drops the reference;
``python -m apt eval --checkpoint`` and ``export`` of such a run work through it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apt import load_profile
from apt.core.errors import CheckpointError
from apt.model import APTModel
from apt.model.layers.lora import LoRALinear
from apt.trainops.engine import Trainer, load_trained_model

BASE = [
    "training.max_steps=6",
    "training.checkpoints.save_interval=3",
    "data.max_corpus_bytes=4000",
    "eval.interval=100",
    "monitoring.log_interval=100",
]


def _train(root: Path, name: str, *overrides: str) -> Path:
    cfg = load_profile(
        "cpu/tiny",
        overrides=[*BASE, f"artifacts.output_dir={root}", f"artifacts.experiment_name={name}",
                   *overrides],
    )  # fmt: skip
    return Trainer.from_config(cfg).train().run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APT_HOME", str(root / "store"))
        return _train(root, "lora", "finetune.lora={rank: 4, alpha: 8}", "finetune.align={}")


def test_a_lora_checkpoint_is_the_merged_model_the_run_exported(lora_run: Path) -> None:
    trained = load_trained_model(lora_run / "checkpoints")
    assert trained.step == 6 and trained.path.name == "step-000000006"
    assert len(trained.merged) == 14  # 7 targets x 2 blocks
    model = trained.model
    assert isinstance(model, APTModel) and model.align is None
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    exported = load_file(str(lora_run / "final_model" / "model.safetensors"))
    state = model.state_dict()
    assert set(exported) <= set(state) and set(state) - set(exported) <= {"lm_head.weight"}
    for name, tensor in exported.items():
        assert torch.equal(state[name], tensor), name  # merged the same way, bit for bit


def test_an_earlier_step_has_other_weights(lora_run: Path) -> None:
    early = load_trained_model(lora_run / "checkpoints" / "step-000000003")
    late = load_trained_model(lora_run / "checkpoints")
    assert early.step == 3
    q = "blocks.0.attn.q_proj.weight"
    assert not torch.equal(early.model.state_dict()[q], late.model.state_dict()[q])


def test_eval_and_export_of_a_lora_checkpoint(lora_run: Path, tmp_path: Path) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40, encoding="utf-8")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "apt", *args]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)

    done = cli("eval", "--checkpoint", str(lora_run / "checkpoints"), "--data", str(text))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loss" in done.stdout
    done = cli("export", str(lora_run / "checkpoints"), "--format", "apt", "--output", "plain")
    assert done.returncode == 0, done.stderr[-2000:]
    plain = APTModel.from_pretrained(tmp_path / "plain")
    final = APTModel.from_pretrained(lora_run / "final_model")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids).logits, final.eval()(ids).logits)


def test_a_folder_without_checkpoints_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint in it"):
        load_trained_model(tmp_path)
    with pytest.raises(CheckpointError, match=r"no such folder"):
        load_trained_model(tmp_path / "missing")
