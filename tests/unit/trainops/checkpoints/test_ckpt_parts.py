"""Named parts: what a bundle saves beyond model/optimizer is one more entry, in every payload."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from apt.core.config.distributed import DistributedConfig
from apt.core.errors import CheckpointError
from apt.trainops.checkpoints import CheckpointManager, FullStatePayload, GatheredStatePayload
from apt.trainops.distributed import DistEnv, build_strategy
from apt.trainops.engine import TrainingBundle

STRATEGY = build_strategy(DistributedConfig(), env=DistEnv.single("cpu"))
PAYLOADS = {"full": FullStatePayload, "gathered": lambda: GatheredStatePayload(STRATEGY)}


def _bundle(seed: int, setup_factory) -> TrainingBundle:
    """A run with a frozen reference model, a value head and the value head's own optimizer."""
    run = setup_factory(seed)
    run.train(2)
    torch.manual_seed(seed + 100)
    head = nn.Linear(8, 1)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    head(torch.randn(3, 8)).sum().backward()
    head_opt.step()
    reference = setup_factory(seed + 200).model.requires_grad_(False)
    return TrainingBundle(
        model=run.model,
        optimizer=run.optimizer,
        lr_scheduler=run.scheduler,
        scaler=torch.amp.GradScaler("cpu"),
        extras={"ref_model": reference, "value_head": head, "value_optimizer": head_opt},
    )


def _states(bundle: TrainingBundle) -> dict[str, object]:
    return {name: part.state_dict() for name, part in bundle.items()}


def _assert_same(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where  # type: ignore[arg-type]
        for i, (x, y) in enumerate(zip(a, b, strict=True)):  # type: ignore[call-overload]
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_every_part_of_a_bundle_round_trips(tmp_path, setup_factory, payload):
    saved = _bundle(0, setup_factory)
    manager = CheckpointManager(save_dir=tmp_path, payload=PAYLOADS[payload]())
    path = manager.save(7, saved)
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["parts"] == {
        "model": {"kind": "module"},
        "optimizer": {"kind": "optimizer", "module": "model"},
        "lr_scheduler": {"kind": "state"},
        "scaler": {"kind": "state"},
        "ref_model": {"kind": "module"},
        "value_head": {"kind": "module"},
        "value_optimizer": {"kind": "optimizer", "module": "value_head"},
    }
    assert {"parts/ref_model/model.safetensors", "parts/value_optimizer/optimizer.pt"} <= set(
        manifest["files"]
    )
    fresh = _bundle(1, setup_factory)  # other weights and moments everywhere
    CheckpointManager(save_dir=tmp_path, payload=PAYLOADS[payload]()).load(7, fresh)
    _assert_same(_states(fresh), _states(saved))


def test_a_second_optimizer_of_one_module(tmp_path):
    def make(seed: int) -> dict[str, object]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        first = torch.optim.AdamW(model[0].parameters(), lr=0.1)
        second = torch.optim.SGD(model[1].parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 4)).sum().backward()
        first.step()
        second.step()
        return {"model": model, "optimizer": first, "head_optimizer": second}

    saved = make(0)
    manager = CheckpointManager(save_dir=tmp_path, payload=GatheredStatePayload(STRATEGY))
    manager.save(1, saved)
    fresh = make(1)
    manager.load(1, fresh)
    _assert_same(
        {k: v.state_dict() for k, v in fresh.items()}, {k: v.state_dict() for k, v in saved.items()}
    )  # type: ignore[attr-defined]


def test_a_part_the_checkpoint_lacks_is_named(tmp_path, setup_factory):
    run = setup_factory(0)
    manager = CheckpointManager(save_dir=tmp_path)
    manager.save(1, model=run.model, optimizer=run.optimizer)
    with pytest.raises(CheckpointError, match=r"no value_head state.*it holds: model, optimizer"):
        manager.load(1, model=run.model, value_head=nn.Linear(8, 1))
    with pytest.raises(CheckpointError, match="saved as a module, but a optimizer"):
        manager.load(1, model=run.optimizer)


def test_parts_that_cannot_be_saved_are_refused(tmp_path, setup_factory):
    manager = CheckpointManager(save_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"'counter' is a int, which has no state_dict"):
        manager.save(1, model=setup_factory(0).model, counter=3)
    with pytest.raises(CheckpointError, match="lower_snake_case"):
        manager.save(1, {"Value-Head": nn.Linear(2, 2)})
    assert manager.list_checkpoints() == []


def test_index_keyed_and_name_keyed_optimizer_states_cross_load(tmp_path, setup_factory):
    run = setup_factory(0)  # TinyNet: the head is tied to the embedding
    run.train(2)
    CheckpointManager(save_dir=tmp_path / "plain").save(2, **run.objects())
    CheckpointManager(save_dir=tmp_path / "named", payload=GatheredStatePayload(STRATEGY)).save(
        2, **run.objects()
    )
    for source, payload in (("plain", GatheredStatePayload(STRATEGY)), ("named", None)):
        other = setup_factory(1)
        other.train(1)
        CheckpointManager(save_dir=tmp_path / source, payload=payload).load(2, **other.objects())
        _assert_same(other.optimizer.state_dict(), run.optimizer.state_dict(), source)
        _assert_same(other.model.state_dict(), run.model.state_dict(), source)
