"""Curriculum schedules drive real model modules at the right epochs and steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apt.core.config import load_profile
from apt.trainops.engine import Callback, Control, RunState, Trainer
from apt.trainops.engine.curriculum import anneal_value

AUX_LOSSES = ("train_moe_balance", "train_moe_z", "train_align_kl")
OVERRIDES = [
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.max_corpus_bytes=12000",
    "training.batch_size=8",
    "training.num_epochs=4",
    "eval.max_batches=2",
    "training.checkpoints.save_interval=null",
    "schedules.enable_moe_at_epoch=1",
    "schedules.enable_align_at_epoch=2",
    "schedules.enable_voter_at_epoch=3",
    "schedules.align_weight={start: 0.1, end: 0.3, by: step, warmup: 5}",
    "monitoring.log_interval=1",
]


class Probe(Callback):
    """Reads the model's switches and scheduled values after the schedule callback ran."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, object]] = []
        self.steps: list[tuple[int, float]] = []
        self.switched_on: dict[int, set[str]] = {}

    def on_epoch_start(self, state: RunState, control: Control) -> None:
        model = state.model
        modules = model.controllable_modules()
        self.epochs.append(
            {
                "epoch": state.epoch,
                "on": {name: bool(m.enabled) for name, m in modules.items()},
                "temp": model.get_scheduled("router.temperature"),
                "capacity": model.get_scheduled("moe.capacity_factor"),
            }
        )

    def on_step_start(self, state: RunState, control: Control) -> None:
        self.steps.append((state.global_step, state.model.get_scheduled("align.loss_weight")))

    def on_step_end(self, state: RunState, control: Control) -> None:
        on = {name for name, m in state.model.controllable_modules().items() if m.enabled}
        self.switched_on[state.global_step] = on


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Probe]:
    out = tmp_path_factory.mktemp("curriculum")
    cfg = load_profile("gpt5_moe_tiny", overrides=[*OVERRIDES, f"artifacts.output_dir={out}"])
    probe = Probe()
    trainer = Trainer.from_config(cfg, callbacks=[probe])
    trainer.train()
    return trainer, probe


def test_modules_switch_on_at_their_epochs(curriculum: tuple[Trainer, Probe]) -> None:
    _, probe = curriculum
    switched = [(e["epoch"], e["on"]) for e in probe.epochs]
    assert switched == [
        (0, {"moe": False, "router": False, "align": False, "voter": False}),
        (1, {"moe": True, "router": True, "align": False, "voter": False}),
        (2, {"moe": True, "router": True, "align": True, "voter": False}),
        (3, {"moe": True, "router": True, "align": True, "voter": True}),
    ]


def test_epoch_annealed_values_equal_the_closed_form(curriculum: tuple[Trainer, Probe]) -> None:
    trainer, probe = curriculum
    specs = trainer.config.schedules.root
    for record in probe.epochs:
        epoch = int(record["epoch"])  # type: ignore[call-overload]
        assert record["temp"] == pytest.approx(anneal_value(specs["route_temp"], epoch, 4))
        assert record["capacity"] == pytest.approx(anneal_value(specs["moe_capacity"], epoch, 4))
    assert probe.epochs[0]["temp"] == pytest.approx(1.5)
    assert probe.epochs[-1]["temp"] == pytest.approx(0.8)


def test_step_annealed_values_equal_the_closed_form(curriculum: tuple[Trainer, Probe]) -> None:
    trainer, probe = curriculum
    spec = trainer.config.schedules.root["align_weight"]
    total = trainer.plan.total_steps
    assert len(probe.steps) == total
    for step, value in probe.steps:
        assert value == pytest.approx(anneal_value(spec, step, total), abs=1e-7)
    assert probe.steps[0][1] == 0.0 and probe.steps[5][1] == pytest.approx(0.1)


def test_the_loss_parts_of_each_step_are_logged_and_sum_to_its_loss(
    curriculum: tuple[Trainer, Probe],
) -> None:
    """train_lm_loss and the auxiliary losses of the modules switched on at that step (none
    before MoE): their sum is the step's train_loss (the same target weighting, 1e-5)."""
    trainer, probe = curriculum
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, trainer.plan.total_steps + 1))
    for record in steps:
        on = probe.switched_on[record["step"]]
        parts = {k: v for k, v in record.items() if k in AUX_LOSSES}
        expected = {"train_moe_balance", "train_moe_z"} if "moe" in on else set()
        expected |= {"train_align_kl"} if "align" in on else set()
        assert set(parts) == expected, record
        if not parts:
            assert "train_lm_loss" not in record
            continue
        assert sum(parts.values()) > 0
        total = record["train_lm_loss"] + sum(parts.values())
        assert total == pytest.approx(record["train_loss"], rel=1e-5), record
        assert 0.0 <= record["train_moe_overflow_fraction"] <= 1.0


def test_training_works_through_the_switches(curriculum: tuple[Trainer, Probe]) -> None:
    trainer, _ = curriculum
    m = trainer.state.metrics
    assert m["val_loss_final"] < m["val_loss_initial"]
    assert "val_voter_fired" in m and m["val_voter_fired"] > 0  # voter on in the last epoch


def test_entropy_voting_callback_switches_the_voter(tmp_path: Path) -> None:
    cfg = load_profile(
        "gpt5_moe_tiny",
        overrides=[
            *OVERRIDES[:10],
            "training.num_epochs=2",
            "schedules={}",
            "callbacks=[{name: entropy_voting, threshold: 0.5}]",
            f"artifacts.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer.from_config(cfg)
    voter = trainer.strategy.unwrap(trainer.model).controllable_modules()["voter"]
    assert not voter.enabled
    trainer.train()
    voting = next(
        cb
        for cb in trainer.callbacks.callbacks
        if type(cb).__name__ == "EntropyBasedVotingCallback"
    )
    # An untrained byte model is uncertain (entropy ~5 nats > 0.5): the first evaluation turns
    # voting on, and it stays on.
    assert voting.decisions[0] == (0, True) and voter.enabled  # type: ignore[attr-defined]
    assert trainer.state.metrics["val_voter_fired"] > 0
