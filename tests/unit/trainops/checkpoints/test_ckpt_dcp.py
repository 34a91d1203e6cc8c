"""Full and DCP state in one process: snapshots, errors, and the pickle-free metadata reader."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.config.distributed import DistributedConfig
from apt.core.errors import CheckpointError
from apt.trainops.checkpoints.dcp import load_dcp, save_dcp
from apt.trainops.distributed import DistEnv, build_strategy

STRATEGY = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))


def _trained(seed: int = 0, momentum: float = 0.9) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_full_state_is_a_snapshot_not_the_live_tensors() -> None:
    model, opt = _trained()
    msd, osd = STRATEGY.full_state_dict(model, opt)
    before = msd["0.weight"].clone()
    momentum = osd["state"]["0.weight"]["momentum_buffer"].clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    opt.state[model[0].weight]["momentum_buffer"].add_(1.0)
    assert torch.equal(msd["0.weight"], before)
    assert torch.equal(osd["state"]["0.weight"]["momentum_buffer"], momentum)


def test_full_state_round_trip_and_no_mutation_of_the_input() -> None:
    model, opt = _trained(0)
    msd, osd = STRATEGY.full_state_dict(model, opt)
    saved = {k: v.clone() for k, v in msd.items()}
    other, other_opt = _trained(1)
    STRATEGY.load_full_state_dict(other, other_opt, msd, osd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(
        other_opt.state[other[0].weight]["momentum_buffer"],
        osd["state"]["0.weight"]["momentum_buffer"],
    )
    assert all(torch.equal(msd[k], v) for k, v in saved.items())


def test_stateless_optimizer_loads_its_hyper_parameters() -> None:
    model, opt = _trained(0, momentum=0.0)
    opt.param_groups[0]["lr"] = 0.025
    msd, osd = STRATEGY.full_state_dict(model, opt)
    other, other_opt = _trained(1, momentum=0.0)
    STRATEGY.load_full_state_dict(other, other_opt, msd, osd)
    assert other_opt.param_groups[0]["lr"] == 0.025


def test_wrong_model_is_a_checkpoint_error() -> None:
    model, opt = _trained()
    msd, _ = STRATEGY.full_state_dict(model, opt)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        STRATEGY.load_full_state_dict(nn.Linear(4, 2), None, msd, {})


def test_dcp_round_trip_in_one_process(tmp_path: Path) -> None:
    model, opt = _trained(0)
    files = save_dcp(tmp_path / "ck", STRATEGY, model, opt)
    assert {p.relative_to(tmp_path / "ck").as_posix() for p in files} == {
        "model/.metadata",
        "model/__0_0.distcp",
        "optim/.metadata",
        "optim/__0_0.distcp",
    }
    other, other_opt = _trained(1)
    load_dcp(tmp_path / "ck", STRATEGY, other, other_opt)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    assert torch.equal(
        other_opt.state[other[2].bias]["momentum_buffer"],
        opt.state[model[2].bias]["momentum_buffer"],
    )


def test_dcp_errors(tmp_path: Path) -> None:
    model, opt = _trained()
    with pytest.raises(CheckpointError, match="no DCP checkpoint"):
        load_dcp(tmp_path / "missing", STRATEGY, model, opt)
    save_dcp(tmp_path / "ck", STRATEGY, model, opt)
    with pytest.raises(CheckpointError, match="cannot load"):
        load_dcp(tmp_path / "ck", STRATEGY, nn.Linear(3, 3), None)


class _Evil:
    def __reduce__(self):  # what a hostile .metadata would carry
        return (Path.touch, (Path(_Evil.target),))

    target = ""


def test_metadata_is_never_unpickled_freely(tmp_path: Path) -> None:
    model, opt = _trained()
    save_dcp(tmp_path / "ck", STRATEGY, model, opt)
    sentinel = tmp_path / "pwned"
    _Evil.target = str(sentinel)
    (tmp_path / "ck" / "model" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match=r"refers to pathlib.Path.touch|not written by"):
        load_dcp(tmp_path / "ck", STRATEGY, model, opt)
    assert not sentinel.exists()


def test_saving_before_the_first_step_leaves_the_optimizer_untouched(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _, osd = STRATEGY.full_state_dict(model, opt)
    save_dcp(tmp_path / "ck", STRATEGY, model, opt)
    assert not opt.state  # the first real step still sees step 0
    assert set(osd["state"]) == {"weight", "bias"}
