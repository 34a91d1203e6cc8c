"""Checkpoints written by APT before format version 2 (tests/fixtures/checkpoints_v1) still load.

The fixtures are real files of the older format: a manager-level checkpoint (model, optimizer,
scheduler, scaler), and run folders of a one-process run and of a 2-rank FSDP run (DCP shards),
each killed after its step-2 checkpoint (see the fixture's README).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from apt import load_profile
from apt.core.config.distributed import DistributedConfig
from apt.trainops.checkpoints import CheckpointManager, GatheredStatePayload
from apt.trainops.checkpoints.dcp import read_dcp_tensors
from apt.trainops.checkpoints.tensorio import join_tensors
from apt.trainops.distributed import DistEnv, build_strategy
from apt.trainops.engine import Trainer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints_v1"
sys.path.insert(0, str(FIXTURES.parents[1] / "unit" / "trainops" / "checkpoints"))
from conftest import make_setup  # noqa: E402  (the TinyNet the manager fixture was saved from)

# The overrides the run folders were made with (README), so the same command resumes them.
RUN = [
    "training.max_steps=4",
    "training.checkpoints.save_interval=2",
    "training.checkpoints.keep_last_n=3",
    "data.max_corpus_bytes=3500",
    "model.hidden_size=16",
    "model.num_heads=2",
    "eval.max_batches=1",
    "eval.interval=2",
    "artifacts.save_final_model=false",
    "training.deterministic=true",
    "artifacts.output_dir=runs",
]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "MANIFEST.json").read_text())


def _saved_optimizer(step_dir: Path) -> dict:
    skeleton = torch.load(step_dir / "optim/optimizer.pt", weights_only=True)
    return join_tensors(skeleton, load_file(str(step_dir / "optim/optimizer.safetensors")))


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    target = tmp_path / "v1"
    shutil.copytree(FIXTURES, target)
    return target


def _fresh_parts() -> dict:
    setup = make_setup(seed=5)  # other weights than the saved ones
    return {
        "model": setup.model,
        "optimizer": setup.optimizer,
        "lr_scheduler": setup.scheduler,
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0),
    }


@pytest.mark.parametrize("payload", ["default", "gathered"])
def test_a_v1_manager_checkpoint_loads_every_part(v1: Path, payload: str) -> None:
    step_dir = v1 / "manager" / "step-000000003"
    assert _manifest(step_dir)["format_version"] == 1 and "parts" not in _manifest(step_dir)
    strategy = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))
    manager = CheckpointManager(
        save_dir=v1 / "manager",
        payload=GatheredStatePayload(strategy) if payload == "gathered" else None,
    )
    parts = _fresh_parts()
    loaded = manager.load_latest(parts, restore_rng=True)
    assert loaded is not None and loaded.step == 3
    assert loaded.trainer_state == {"epoch": 0, "cursor": 3}
    assert loaded.metrics == {"train_loss": 1.5}
    weights = load_file(str(step_dir / "model/model.safetensors"))
    own = parts["model"].state_dict()
    assert set(weights) <= set(own)
    for name, tensor in weights.items():
        assert torch.equal(own[name], tensor), name
    saved = _saved_optimizer(step_dir)  # keyed by parameter index, as v1 wrote it
    live = parts["optimizer"].state_dict()
    assert live["state"].keys() == saved["state"].keys()
    for index, moments in saved["state"].items():
        for key, value in moments.items():
            assert torch.equal(live["state"][index][key], value), (index, key)
    assert parts["lr_scheduler"].last_epoch == 3
    assert parts["scaler"].get_scale() == 1024.0


def test_a_v1_run_resumes_and_ends_as_an_uninterrupted_run(v1: Path, in_tmp: Path) -> None:
    (in_tmp / "runs").mkdir()
    shutil.copytree(v1 / "run_single", in_tmp / "runs" / "single")
    resumed = Trainer.from_config(
        load_profile("cpu/tiny", overrides=[*RUN, "artifacts.experiment_name=single"])
    ).train()
    assert resumed.global_step == 4
    fresh = Trainer.from_config(
        load_profile("cpu/tiny", overrides=[*RUN, "artifacts.experiment_name=fresh"])
    ).train()
    assert fresh.global_step == 4

    def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
        return load_file(str(run / f"checkpoints/step-{step:09d}/model/model.safetensors"))

    a, b = weights(in_tmp / "runs/single", 4), weights(in_tmp / "runs/fresh", 4)
    assert a.keys() == b.keys()
    # Bit for bit where this CPU rounds as the one that wrote the fixture did (its step 2 is
    # this machine's step 2); another CPU's kernels round otherwise from the first step on,
    # and then the resumed run can only be as close as two machines' runs are.
    ours, theirs = weights(in_tmp / "runs/fresh", 2), weights(v1 / "run_single", 2)
    same_machine = all(torch.equal(ours[name], theirs[name]) for name in ours)
    for name in a:
        if same_machine:
            assert torch.equal(a[name], b[name]), name
        else:
            assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-5), name
    assert _manifest(in_tmp / "runs/single/checkpoints/step-000000004")["format_version"] == 2


def test_a_v1_fsdp_checkpoint_loads_in_one_process(v1: Path, in_tmp: Path) -> None:
    step_dir = v1 / "run_fsdp" / "checkpoints" / "step-000000002"
    cfg = load_profile("cpu/tiny", overrides=[*RUN, "artifacts.experiment_name=fsdp"])
    trainer = Trainer.from_config(cfg, allow_config_change=True)  # 2 ranks -> 1
    manager = CheckpointManager(
        save_dir=step_dir.parent, payload=GatheredStatePayload(trainer.strategy)
    )
    loaded = manager.load_latest(trainer.bundle)
    assert loaded is not None and loaded.step == 2
    shards = read_dcp_tensors(step_dir / "model")
    own = trainer.model.state_dict()
    for name, tensor in shards.items():
        assert torch.equal(own[name], tensor), name
    moments = read_dcp_tensors(step_dir / "optim")  # keyed state.<parameter name>.<moment>
    live = get_optimizer_state_dict(trainer.model, trainer.bundle.optimizer)["state"]
    assert len(live) == len(list(trainer.model.parameters()))
    for name, state in live.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[moment], moments[f"state.{name}.{moment}"]), (name, moment)

    shutil.copytree(v1 / "run_fsdp", in_tmp / "runs" / "fsdp", dirs_exist_ok=True)
    result = Trainer.from_config(cfg, allow_config_change=True).train()
    assert result.global_step == 4 and result.finished
