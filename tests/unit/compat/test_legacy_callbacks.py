"""1.x callbacks: ``CallbackManager.trigger``, the two built-in 1.x callbacks, and a 1.x
``TrainingCallback`` subclass inside a real 2.0 ``Trainer`` run (the whole hook sequence, with
its epoch numbers, batch indices, step numbers and losses, against the expected list)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from apt.trainops.engine import Callback, Control, RunState, Trainer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from apt_model.training.callbacks import (
        CallbackManager,
        EntropyBasedVotingCallback,
        ScheduleCallback,
        ScheduleExecutor,
        TrainingCallback,
    )


class Recording(TrainingCallback):
    """A 1.x callback overriding every hook with the 1.x signatures."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def on_train_begin(self, **kwargs: Any) -> None:
        self.calls.append(("on_train_begin", kwargs))

    def on_train_end(self, **kwargs: Any) -> None:
        self.calls.append(("on_train_end", kwargs))

    def on_epoch_begin(self, epoch: int, **kwargs: Any) -> None:
        self.calls.append(("on_epoch_begin", {"epoch": epoch, **kwargs}))

    def on_epoch_end(self, epoch: int, metrics: dict[str, Any], **kwargs: Any) -> None:
        self.calls.append(("on_epoch_end", {"epoch": epoch, "metrics": metrics, **kwargs}))

    def on_batch_begin(self, batch_idx: int, **kwargs: Any) -> None:
        self.calls.append(("on_batch_begin", {"batch_idx": batch_idx, **kwargs}))

    def on_batch_end(self, batch_idx: int, loss: float, **kwargs: Any) -> None:
        self.calls.append(("on_batch_end", {"batch_idx": batch_idx, "loss": loss, **kwargs}))

    def on_step(self, step: int, **kwargs: Any) -> None:
        self.calls.append(("on_step", {"step": step, **kwargs}))


class Truth(Callback):
    """What the 2.0 engine itself reports: each step's loss and each epoch's metrics."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.batch_losses: list[float] = []
        self.metrics: dict[int, dict[str, float]] = {}

    def on_batch_end(self, state: RunState, control: Control) -> None:
        self.batch_losses.append(state.batch_loss)

    def on_step_end(self, state: RunState, control: Control) -> None:
        self.losses[state.global_step] = state.last_loss

    def on_epoch_end(self, state: RunState, control: Control) -> None:
        self.metrics[state.epoch] = state.metrics


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids))  # (B, T, V)


def run(tmp_path: Path, callbacks: list[Callback], *, accumulation: int, epochs: int) -> Trainer:
    """16 sequences in micro-batches of 4 (1.x style ``(inputs, targets)`` tuples)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 16, (16, 9))
    pairs = [(row[:-1], row[1:]) for row in ids]
    trainer = Trainer(
        model=TinyLM(),
        train_dataloader=DataLoader(pairs, batch_size=4, shuffle=False),
        callbacks=callbacks,
        num_epochs=epochs,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.01,
        output_dir=str(tmp_path),
        experiment_name="legacy_hooks",
    )
    trainer.train()
    return trainer


def test_a_1x_callback_in_the_2_0_trainer_gets_the_1x_hook_sequence(tmp_path: Path) -> None:
    legacy, truth = Recording(), Truth()
    run(tmp_path, [legacy, truth], accumulation=1, epochs=2)
    expected: list[tuple[str, dict[str, Any]]] = [("on_train_begin", {})]
    step = 0
    for epoch in range(2):
        expected.append(("on_epoch_begin", {"epoch": epoch}))
        for batch_idx in range(4):
            step += 1
            expected += [
                ("on_batch_begin", {"batch_idx": batch_idx}),
                ("on_batch_end", {"batch_idx": batch_idx, "loss": truth.losses[step]}),
                ("on_step", {"step": step}),
            ]
        expected.append(("on_epoch_end", {"epoch": epoch, "metrics": truth.metrics[epoch]}))
    expected.append(("on_train_end", {}))
    assert legacy.calls == expected
    losses = [kw["loss"] for name, kw in legacy.calls if name == "on_batch_end"]
    assert len(losses) == 8 and all(isinstance(x, float) and math.isfinite(x) for x in losses)
    assert len(set(losses)) == 8  # each batch its own loss, not a stale one


def test_with_gradient_accumulation_each_micro_batch_ends_with_its_own_loss(
    tmp_path: Path,
) -> None:
    legacy, truth = Recording(), Truth()
    run(tmp_path, [legacy, truth], accumulation=2, epochs=1)
    expected: list[tuple[str, dict[str, Any]]] = [
        ("on_train_begin", {}),
        ("on_epoch_begin", {"epoch": 0}),
    ]
    for step, first in ((1, 0), (2, 2)):
        expected += [
            ("on_batch_begin", {"batch_idx": first}),
            ("on_batch_end", {"batch_idx": first, "loss": truth.batch_losses[first]}),
            ("on_batch_begin", {"batch_idx": first + 1}),
            ("on_batch_end", {"batch_idx": first + 1, "loss": truth.batch_losses[first + 1]}),
            ("on_step", {"step": step}),
        ]
        # equal target counts: the step's loss is the mean of its micro-batches' losses
        pair = truth.batch_losses[first : first + 2]
        assert pair[0] != pair[1]
        assert sum(pair) / 2 == pytest.approx(truth.losses[step], rel=1e-6)
    expected += [("on_epoch_end", {"epoch": 0, "metrics": truth.metrics[0]}), ("on_train_end", {})]
    assert legacy.calls == expected


def test_a_1x_schedule_callback_in_the_2_0_trainer(tmp_path: Path) -> None:
    log: list[tuple[str, float]] = []
    voter = SimpleNamespace(
        enable=lambda flag: log.append(("enable", flag)),
        set_entropy_threshold=lambda v: log.append(("threshold", v)),
    )
    schedules = {
        "enable_voter_at_epoch": 1,
        "vote_threshold": {"start": 2.0, "end": 1.0, "by": "step"},
    }
    ex = ScheduleExecutor(SimpleNamespace(schedules=schedules), {"voter": voter}, 2, 8)
    run(tmp_path, [ScheduleCallback(ex)], accumulation=1, epochs=2)
    thresholds = [("threshold", pytest.approx(2.0 - step / 8)) for step in range(1, 9)]
    assert log == [*thresholds[:4], ("enable", True), *thresholds[4:]]


def test_hooks_with_shared_names_still_answer_1x_calls() -> None:
    class Base(TrainingCallback):
        def __init__(self) -> None:
            self.seen: list[Any] = []

        def on_batch_end(self, batch_idx: int, loss: float, **kwargs: Any) -> None:
            self.seen.append(("base", batch_idx, loss))

    class Child(Base):
        def on_batch_end(self, batch_idx: int, loss: float, **kwargs: Any) -> None:
            self.seen.append(("child", batch_idx, loss, kwargs))
            super().on_batch_end(batch_idx, loss)

        def on_epoch_end(self, epoch: int, metrics: dict[str, Any], **kwargs: Any) -> None:
            self.seen.append(("epoch_end", epoch, metrics))

    cb = Child()
    cb.on_batch_end(3, 0.5, entropy=1.0)
    cb.on_batch_end(batch_idx=4, loss=0.25)
    cb.on_epoch_end(1, {"val_loss": 2.0})
    cb.on_train_end()
    assert cb.seen == [
        ("child", 3, 0.5, {"entropy": 1.0}),
        ("base", 3, 0.5),
        ("child", 4, 0.25, {}),
        ("base", 4, 0.25),
        ("epoch_end", 1, {"val_loss": 2.0}),
    ]


def test_callback_manager_triggers_in_order_and_skips_missing_hooks() -> None:
    seen: list[Any] = []

    class First(TrainingCallback):
        def on_step(self, step: int, **kwargs: Any) -> None:
            seen.append(("first", step, kwargs))

    class DuckTyped:  # a 1.x callback need not derive from TrainingCallback
        def on_step(self, step: int) -> None:
            seen.append(("duck", step))

    callbacks: list[Any] = [First(), object(), DuckTyped()]
    manager = CallbackManager(callbacks)
    assert manager.callbacks is callbacks
    manager.trigger("on_step", step=7)
    manager.trigger("on_validation_end", score=1.0)  # nobody has it: nothing happens
    assert seen == [("first", 7, {}), ("duck", 7)]
    with pytest.raises(TypeError):
        manager.trigger("on_epoch_end", epoch=0)  # 1.x: metrics is required


def test_schedule_callback_through_the_manager_as_in_1x_train_model() -> None:
    log: list[Any] = []
    moe = SimpleNamespace(
        enable=lambda f: log.append(("moe", f)),
        set_capacity_factor=lambda v: log.append(("cap", v)),
    )
    schedules = {
        "enable_moe_at_epoch": 1,
        "moe_capacity": {"start": 1.5, "end": 1.0, "by": "epoch"},
    }
    ex = ScheduleExecutor(SimpleNamespace(schedules=schedules), {"moe": moe}, 2, 4)
    manager = CallbackManager([ScheduleCallback(ex)])
    manager.trigger("on_train_begin")
    for epoch in range(2):
        manager.trigger("on_epoch_begin", epoch=epoch)
        manager.trigger("on_batch_end", batch_idx=0, loss=1.0)
        manager.trigger("on_step", step=epoch + 1)
        manager.trigger("on_epoch_end", epoch=epoch, metrics={})
    manager.trigger("on_train_end")
    assert log == [("cap", 1.5), ("moe", True), ("cap", 1.25)]


def test_entropy_based_voting_follows_the_batch_entropy() -> None:
    flags: list[bool] = []
    voter = SimpleNamespace(enable=flags.append)
    cb = EntropyBasedVotingCallback({"voter": voter}, threshold=2.0)
    for entropy in (2.5, 1.0, None, 2.0, 3.0):
        cb.on_batch_end(batch_idx=0, loss=1.0, entropy=entropy)
    assert flags == [True, False, False, True]
    EntropyBasedVotingCallback({}, threshold=1.0).on_batch_end(0, 1.0, entropy=5.0)  # no voter
    assert EntropyBasedVotingCallback({}).threshold == 2.2
