"""LR schedules follow their closed forms, warmup included."""

from __future__ import annotations

import math

import pytest
import torch

from apt.core.config.training import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    PlateauSchedule,
    StepSchedule,
    WSDSchedule,
)
from apt.trainops.engine.lr_schedules import build_lr_scheduler

PEAK, TOTAL, WARM = 1e-2, 100, 10


def curve(cfg: object, steps: int = TOTAL) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched = build_lr_scheduler(cfg, optimizer=opt, total_steps=TOTAL)  # type: ignore[arg-type]
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def progress(step: int) -> float:
    return min((step - WARM) / (TOTAL - WARM), 1.0)


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (ConstantSchedule(warmup_steps=WARM), lambda s: 1.0),
        (LinearSchedule(warmup_steps=WARM, min_lr_ratio=0.1), lambda s: 1 - 0.9 * progress(s)),
        (
            CosineSchedule(warmup_steps=WARM, min_lr_ratio=0.1),
            lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(s))),
        ),
        (
            StepSchedule(warmup_steps=WARM, step_size=30, gamma=0.5),
            lambda s: 0.5 ** ((s - WARM) // 30),
        ),
        (ExponentialSchedule(warmup_steps=WARM, gamma=0.97), lambda s: 0.97 ** (s - WARM)),
        (
            WSDSchedule(warmup_steps=WARM, decay_fraction=0.2, min_lr_ratio=0.0),
            lambda s: 1.0 if progress(s) <= 0.8 else 1 - (progress(s) - 0.8) / 0.2,
        ),
    ],
    ids=lambda c: getattr(c, "type", ""),
)
def test_schedule_matches_closed_form(cfg: object, shape: object) -> None:
    lrs = curve(cfg)
    for step, lr in enumerate(lrs):
        expected = PEAK * ((step + 1) / WARM if step < WARM else shape(step))  # type: ignore[operator]
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15), step


def test_cosine_reaches_its_floor_at_the_last_step() -> None:
    lrs = curve(CosineSchedule(warmup_steps=0, min_lr_ratio=0.1), steps=TOTAL + 1)
    assert lrs[0] == pytest.approx(PEAK) and lrs[TOTAL] == pytest.approx(0.1 * PEAK)


def test_plateau_decays_after_patience_and_round_trips() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    sched = build_lr_scheduler(
        PlateauSchedule(factor=0.5, patience=1), optimizer=opt, total_steps=TOTAL
    )
    for value in (1.0, 0.9, 0.95, 0.95):
        sched.report(value)  # type: ignore[union-attr]
    assert opt.param_groups[0]["lr"] == pytest.approx(PEAK * 0.5)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    again = build_lr_scheduler(
        PlateauSchedule(factor=0.5, patience=1), optimizer=opt2, total_steps=TOTAL
    )
    again.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(PEAK * 0.5)
