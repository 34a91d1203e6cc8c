"""Save -> load continues bit for bit: weights, AdamW, LR schedule, every RNG; names and API."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apt.core.config import CheckpointConfig
from apt.core.errors import CheckpointError, ConfigError
from apt.trainops.checkpoints import (
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from apt.trainops.checkpoints.rng import join_rng_state, split_rng_state


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_exact(ckpt_dir, setup_factory, seed_everything):
    seed_everything(7)
    golden = setup_factory(0)
    golden_losses = golden.train(3)
    manager = CheckpointManager(save_dir=ckpt_dir, save_interval=3, keep_last_n=2)
    manager.save(
        3,
        **golden.objects(),
        trainer_state={"epoch": 0, "cursor": 3},
        metrics={"train_loss": golden_losses[-1]},
    )
    golden_losses += golden.train(4)  # the save itself consumed no randomness

    # a "new process": other initial weights and other RNG positions
    seed_everything(999)
    resumed = setup_factory(1)
    loaded = CheckpointManager(save_dir=ckpt_dir).load_latest(**resumed.objects(), restore_rng=True)
    assert loaded is not None and loaded.step == 3
    assert loaded.trainer_state == {"epoch": 0, "cursor": 3}
    assert loaded.metrics == {"train_loss": golden_losses[2]}
    assert resumed.scheduler.last_epoch == 3
    resumed_losses = resumed.train(4)

    assert resumed_losses == golden_losses[3:]
    _assert_bitwise(_weights(resumed.model), _weights(golden.model))
    opt_a, opt_b = resumed.optimizer.state_dict(), golden.optimizer.state_dict()
    for pid, state in opt_b["state"].items():
        for key, value in state.items():
            assert torch.equal(opt_a["state"][pid][key], value), (pid, key)
    assert resumed.scheduler.state_dict() == golden.scheduler.state_dict()


def test_rng_streams_continue(seed_everything):
    seed_everything(3)
    state = capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    plain, tensors = split_rng_state(state)
    restore_rng_state(join_rng_state(json.loads(json.dumps(plain)), tensors))  # as stored
    got = (random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_tied_weights_are_stored_once_and_stay_tied(ckpt_dir, setup_factory):
    run = setup_factory(0)
    path = CheckpointManager(save_dir=ckpt_dir).save(1, model=run.model)
    raw = load_file(str(path / "model/model.safetensors"))
    assert "emb.weight" in raw and "head.weight" not in raw  # one copy on disk
    fresh = setup_factory(5)
    CheckpointManager(save_dir=ckpt_dir).load(1, model=fresh.model)
    assert fresh.model.head.weight is fresh.model.emb.weight
    assert torch.equal(fresh.model.emb.weight, run.model.emb.weight)


def test_compiled_and_wrapped_names_are_clean(ckpt_dir, setup_factory):
    run = setup_factory(0)
    compiled = torch.compile(run.model)  # wrapping only; nothing is compiled until a forward
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = CheckpointManager(save_dir=ckpt_dir).save(1, model=compiled)
    with open(path / "model/model.safetensors", "rb") as fh:
        header = fh.read(4096)
    assert b"_orig_mod" not in header

    plain = setup_factory(3)
    CheckpointManager(save_dir=ckpt_dir).load(1, model=plain.model)  # compiled -> plain
    assert torch.equal(plain.model.proj.weight, run.model.proj.weight)

    CheckpointManager(save_dir=ckpt_dir).save(2, model=plain.model)
    again = setup_factory(4)
    target = torch.compile(again.model)
    CheckpointManager(save_dir=ckpt_dir).load(2, model=target)  # plain -> compiled
    assert torch.equal(again.model.proj.weight, run.model.proj.weight)


def test_nested_compiled_submodule_names(ckpt_dir, setup_factory):
    run = setup_factory(0)
    run.model.proj = torch.compile(run.model.proj)  # "proj._orig_mod.weight"
    CheckpointManager(save_dir=ckpt_dir).save(1, model=run.model)
    plain = setup_factory(2)
    CheckpointManager(save_dir=ckpt_dir).load(1, model=plain.model)
    assert torch.equal(plain.model.proj.weight, run.model.proj.weight)


@pytest.mark.parametrize("name", [1000, "1000", "checkpoint-1000", "step-000001000"])
def test_load_by_any_name(ckpt_dir, setup_factory, name):
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=str(ckpt_dir), save_interval=500, keep_last_n=5)
    manager.save(model=run.model, optimizer=run.optimizer, step=1000)
    assert manager.load(name, model=run.model).step == 1000
    assert manager.load(ckpt_dir / "step-000001000").step == 1000  # a folder works too


def test_layout_and_latest(ckpt_dir, setup_factory):
    run = setup_factory(0)
    run.train(1)
    manager = CheckpointManager(save_dir=ckpt_dir)
    path = manager.save(1200, **run.objects(), scaler=torch.amp.GradScaler("cpu"))
    assert path == ckpt_dir / "step-000001200"
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert names == {
        "MANIFEST.json",
        "trainer_state.json",
        "model/model.safetensors",
        "optim/optimizer.pt",
        "optim/optimizer.safetensors",
        "parts/lr_scheduler/state.pt",
        "parts/scaler/state.pt",
        "rng/rank-00000.json",
        "rng/rank-00000.safetensors",
    }
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["step"] == 1200 and manifest["format_version"] == 2
    assert manifest["parts"] == {
        "model": {"kind": "module"},
        "optimizer": {"kind": "optimizer", "module": "model"},
        "lr_scheduler": {"kind": "state"},
        "scaler": {"kind": "state"},
    }
    assert set(manifest["files"]) == names - {"MANIFEST.json"}
    assert (ckpt_dir / "LATEST").read_text().strip() == "step-000001200"
    assert manager.latest_step() == 1200


def test_missing_checkpoint_lists_available(ckpt_dir, setup_factory):
    manager = CheckpointManager(save_dir=ckpt_dir)
    manager.save(5, model=setup_factory(0).model)
    with pytest.raises(CheckpointError, match=r"no checkpoint 'checkpoint-6'.*step-000000005"):
        manager.load("checkpoint-6")


def test_loading_into_the_wrong_model_says_what_differs(ckpt_dir, setup_factory):
    manager = CheckpointManager(save_dir=ckpt_dir)
    manager.save(1, model=setup_factory(0).model)
    expected = r"missing \['bias', 'weight'\], unexpected \['emb.weight'"
    with pytest.raises(CheckpointError, match=expected):
        manager.load(1, model=torch.nn.Linear(2, 2))


def test_optimizer_requested_but_not_saved(ckpt_dir, setup_factory):
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=ckpt_dir)
    manager.save(1, model=run.model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        manager.load(1, model=run.model, optimizer=run.optimizer)


def test_config_and_overrides(in_tmp):
    cfg = CheckpointConfig(save_interval=100, keep_last_n=4, directory="ck")
    manager = CheckpointManager(cfg, keep_last_n=2)
    assert manager.cfg.keep_last_n == 2 and manager.cfg.save_interval == 100
    assert manager.save_dir == Path("ck") and (in_tmp / "ck").is_dir()
    assert [s for s in range(0, 401) if manager.should_save(s)] == [100, 200, 300, 400]
    assert not CheckpointManager(save_dir="x", save_interval=None).should_save(100)
    with pytest.raises(ConfigError, match="keep_lastn"):
        CheckpointManager(save_dir="x", keep_lastn=3)


def test_state_that_needs_pickle_is_refused_at_save(ckpt_dir, setup_factory):
    class Odd:
        pass

    class Sched:
        def state_dict(self):
            return {"fn": Odd()}

    with pytest.raises(CheckpointError, match=r"scheduler state at fn holds a .*Odd"):
        CheckpointManager(save_dir=ckpt_dir).save(
            1, model=setup_factory(0).model, lr_scheduler=Sched()
        )
    with pytest.raises(CheckpointError, match="not JSON"):
        CheckpointManager(save_dir=ckpt_dir).save(
            1, model=setup_factory(0).model, trainer_state={"x": object()}
        )


def test_a_misspelled_option_names_the_nearest_one(ckpt_dir):
    with pytest.raises(
        ConfigError, match=r"keep_lastn: unknown option\. Did you mean 'keep_last_n'"
    ) as err:
        CheckpointManager(save_dir=ckpt_dir, keep_lastn=5)
    assert "errors.pydantic.dev" not in str(err.value)
    with pytest.raises(
        ConfigError, match=r"keep_last_n: Input should be greater than or equal to 1"
    ):
        CheckpointManager(save_dir=ckpt_dir, keep_last_n=0)
