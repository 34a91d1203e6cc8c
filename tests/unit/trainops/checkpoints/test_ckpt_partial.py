"""A module that holds part of the model (a pipeline rank's stages) against a whole state.

``check_fits`` with ``partial`` parts accepts a whole checkpoint whose tensors and optimizer
groups include the part's, and refuses what cannot be split: a tensor or a parameter the
checkpoint lacks, another number of parameter groups, an optimizer state keyed by index.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.config.distributed import DistributedConfig
from apt.trainops.checkpoints import (
    CheckpointManager,
    CheckpointMismatchError,
    FullStatePayload,
    GatheredStatePayload,
    describe_parts,
    verify_checkpoint,
)
from apt.trainops.checkpoints.restore import check_fits
from apt.trainops.distributed import DistEnv, build_strategy

STRATEGY = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))


class Stage(nn.Module):
    """The ``proj`` layer of the conftest's TinyNet, under the same name."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        if extra:  # a parameter the whole model does not have
            self.gate = nn.Parameter(torch.zeros(8))


def _saved(tmp_path: Path, setup_factory, payload) -> Path:
    run = setup_factory(0)
    run.train(2)
    manager = CheckpointManager(save_dir=tmp_path, payload=payload)
    manager.save(5, model=run.model, optimizer=run.optimizer)
    return tmp_path / "step-000000005"


def _parts(stage: nn.Module, groups: int = 1, *, partial: bool = True):
    params = list(stage.parameters())
    param_groups = [{"params": params}] if groups == 1 else [{"params": [p]} for p in params]
    optimizer = torch.optim.AdamW(param_groups, lr=1e-2)
    return describe_parts({"model": stage, "optimizer": optimizer}, partial=partial)


def test_a_part_of_a_whole_state_fits(tmp_path: Path, setup_factory) -> None:
    ckpt = verify_checkpoint(_saved(tmp_path, setup_factory, GatheredStatePayload(STRATEGY)))
    parts = _parts(Stage())
    assert [p.partial for p in parts] == [True, True]
    check_fits(ckpt, parts)  # proj.* is in the checkpoint; emb/head are the other stages'
    with pytest.raises(CheckpointMismatchError, match="It holds more tensors than the module"):
        check_fits(ckpt, _parts(Stage(), partial=False))


@pytest.mark.parametrize(
    ("stage", "groups", "message"),
    [
        (Stage(extra=True), 1, "missing ['gate']"),
        (Stage(), 2, "it has 1 parameter groups, the given optimizer 2"),
    ],
)
def test_what_a_part_cannot_take_from_a_whole_state_is_refused(
    tmp_path: Path, setup_factory, stage: nn.Module, groups: int, message: str
) -> None:
    ckpt = verify_checkpoint(_saved(tmp_path, setup_factory, GatheredStatePayload(STRATEGY)))
    with pytest.raises(CheckpointMismatchError) as err:
        check_fits(ckpt, _parts(stage, groups))
    assert message in str(err.value) and "step-000000005" in str(err.value)


def test_a_parameter_its_group_does_not_name_is_refused(tmp_path: Path, setup_factory) -> None:
    """The whole run kept proj.bias frozen (not in its optimizer); the stage trains it."""
    model = setup_factory(0).model
    trained = [p for n, p in model.named_parameters() if n != "proj.bias"]
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    manager = CheckpointManager(save_dir=tmp_path, payload=GatheredStatePayload(STRATEGY))
    manager.save(5, model=model, optimizer=optimizer)
    ckpt = verify_checkpoint(tmp_path / "step-000000005")
    with pytest.raises(CheckpointMismatchError, match=r"group 0 does not name \['proj.bias'\]"):
        check_fits(ckpt, _parts(Stage()))


def test_an_optimizer_state_keyed_by_index_is_refused_naming_the_fix(
    tmp_path: Path, setup_factory
) -> None:
    ckpt = verify_checkpoint(_saved(tmp_path, setup_factory, FullStatePayload()))
    with pytest.raises(CheckpointMismatchError, match="keys its parameters by index") as err:
        check_fits(ckpt, _parts(Stage()))
    assert "save it again through the Trainer" in str(err.value)
