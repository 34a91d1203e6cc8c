"""``training.on_nonfinite``: a diverged run stops at the step that diverged, skips it, or goes on
— and never saves a checkpoint of NaN weights under ``stop``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_lm import BigramLM, PatternText

from apt.core.errors import TrainingDiverged
from apt.trainops.checkpoints import CheckpointManager
from apt.trainops.engine import Callback, Control, RunState, Trainer


class PoisonWeights(Callback):
    """Fills one weight with NaN at the end of ``step`` (the weights stay NaN)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: RunState, control: Control) -> None:
        if state.global_step == self.step:
            with torch.no_grad():
                state.model.proj.weight.fill_(float("nan"))


class PoisonOneStep(Callback):
    """Makes the loss of step ``step`` NaN (the weights stay finite); records the weights seen
    at the end of every step."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.hook: Any = None
        self.seen: dict[int, torch.Tensor] = {}

    def on_step_start(self, state: RunState, control: Control) -> None:
        if state.global_step + 1 == self.step:
            self.hook = state.model.proj.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_step_end(self, state: RunState, control: Control) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.seen[state.global_step] = state.model.proj.weight.detach().clone()


def make(tmp_path: Path, name: str = "run", **kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    options: dict[str, Any] = {
        "batch_size": 8,
        "max_steps": 8,
        "learning_rate": 0.05,
        "save_interval": 2,
        **kwargs,
    }
    return Trainer(
        model=BigramLM(),
        train_dataset=PatternText(padded=False),
        output_dir=str(tmp_path),
        experiment_name=name,
        **options,
    )


def committed_steps(trainer: Trainer) -> list[int]:
    manager: CheckpointManager = trainer.checkpoints.manager
    return [info.step for info in manager.list_checkpoints()]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    ("save_interval", "poison_at", "named"),
    [
        (2, 3, "step 4: the training loss is nan"),  # found by the loss of the next step
        (1, 3, "weight tensor(s) hold NaN"),  # found by the weight check before the save
        (2, 5, "step 6: the training loss is nan"),
    ],
)
def test_stop_names_the_step_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path, save_interval: int, poison_at: int, named: str
) -> None:
    trainer = make(tmp_path, save_interval=save_interval, callbacks=[PoisonWeights(poison_at)])
    with pytest.raises(TrainingDiverged, match="on_nonfinite: stop") as caught:
        trainer.train()
    assert named in str(caught.value)
    steps = committed_steps(trainer)
    assert steps and max(steps) <= poison_at
    newest = max(steps)
    # The newest checkpoint holds finite weights: resume it (without the poison) and finish.
    loaded = trainer.checkpoints.manager.load_latest({"model": BigramLM()})
    assert loaded is not None and loaded.step == newest
    resumed = make(tmp_path, save_interval=save_interval)
    result = resumed.train()
    assert result.finished and result.global_step == 8
    assert all(torch.isfinite(v).all() for v in weights(resumed).values())


def test_a_resume_after_stop_equals_a_run_that_never_diverged(tmp_path: Path) -> None:
    with pytest.raises(TrainingDiverged):
        make(tmp_path, "diverged", callbacks=[PoisonWeights(5)]).train()
    resumed = make(tmp_path, "diverged")
    resumed.train()
    clean = make(tmp_path, "clean")
    clean.train()
    for key, value in weights(clean).items():
        assert torch.equal(value, weights(resumed)[key]), key


def test_stop_catches_a_nan_loss_even_without_a_save_or_evaluation_before_the_end(
    tmp_path: Path,
) -> None:
    trainer = make(tmp_path, save_interval=None, max_steps=6, callbacks=[PoisonWeights(2)])
    with pytest.raises(TrainingDiverged, match="step 3: the training loss is nan"):
        trainer.train()
    assert committed_steps(trainer) == []  # the final checkpoint was never written
    assert not (trainer.run_dir / "final_model").exists()


def test_skip_step_skips_the_update_and_counts_it(tmp_path: Path) -> None:
    poison = PoisonOneStep(4)
    trainer = make(tmp_path, on_nonfinite="skip_step", max_grad_norm=None, callbacks=[poison])
    result = trainer.train()
    assert result.finished and result.global_step == 8
    assert trainer.state.skipped_steps == 1 and trainer.state.nonfinite_streak == 0
    assert torch.equal(poison.seen[4], poison.seen[3])  # no update at step 4
    assert not torch.equal(poison.seen[5], poison.seen[4])  # training went on
    assert all(torch.isfinite(v).all() for v in weights(trainer).values())


def test_skip_step_skips_on_a_nonfinite_gradient_norm(tmp_path: Path) -> None:
    poison = PoisonOneStep(2)
    trainer = make(tmp_path, on_nonfinite="skip_step", max_grad_norm=1.0, callbacks=[poison])
    trainer.train()
    assert trainer.state.skipped_steps == 1
    assert torch.equal(poison.seen[2], poison.seen[1])


def test_skip_step_fails_after_max_skipped_steps_in_a_row(tmp_path: Path) -> None:
    trainer = make(
        tmp_path,
        on_nonfinite="skip_step",
        max_skipped_steps=3,
        max_steps=20,
        save_interval=100,
        callbacks=[PoisonWeights(2)],
    )
    with pytest.raises(TrainingDiverged, match=r"step 6: .* 4th step in a row") as caught:
        trainer.train()
    assert "max_skipped_steps: 3" in str(caught.value)
    assert trainer.state.skipped_steps == 3  # steps 3, 4, 5 skipped, the 4th in a row failed


def test_skip_counts_survive_a_resume(tmp_path: Path) -> None:
    poison = PoisonOneStep(3)
    first = make(tmp_path, on_nonfinite="skip_step", max_steps=4, callbacks=[poison])
    first.train()
    assert first.state.skipped_steps == 1
    second = make(tmp_path, on_nonfinite="skip_step", max_steps=8)
    second.train()
    assert second.state.skipped_steps == 1  # restored from the checkpoint of step 4


def test_continue_trains_on_and_keeps_metrics_json_valid(tmp_path: Path) -> None:
    trainer = make(
        tmp_path,
        on_nonfinite="continue",
        max_steps=10,  # monitoring.log_interval
        eval_dataset=PatternText(n=16, padded=False),
        callbacks=[PoisonWeights(2)],
    )
    result = trainer.train()
    assert result.finished and result.global_step == 10
    assert committed_steps(trainer)[-1] == 10

    def refuse(constant: str) -> None:
        raise AssertionError(f"metrics.jsonl holds a bare {constant}")

    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert any(r.get("train_loss", 0) is None for r in records)
    assert any(r.get("val_loss", 0) is None for r in records)


def test_the_cli_exits_3_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from apt.cli.main import main

    code = main(
        [
            "train",
            "--profile",
            "cpu/tiny",
            "--set",
            f"artifacts.output_dir={tmp_path}",
            "--set",
            "training.learning_rate=1e30",
            "--set",
            "training.max_grad_norm=null",
            "--set",
            "training.max_steps=6",
            "--set",
            "training.checkpoints.save_interval=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert "on_nonfinite: stop" in err and "Traceback" not in err


class PoisonModelWeights(Callback):
    """Fills every weight of the model with NaN at the end of ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state: RunState, control: Control) -> None:
        if state.global_step == self.step:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.fill_(float("nan"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("save_interval", [None, 3])
def test_stop_on_cuda_reads_the_step_without_a_sync_and_still_names_it(
    tmp_path: Path, save_interval: int | None
) -> None:
    trainer = make(
        tmp_path,
        device="cuda",
        max_steps=12,
        save_interval=save_interval,
        callbacks=[PoisonModelWeights(4)],
    )
    with pytest.raises(TrainingDiverged, match="on_nonfinite: stop") as caught:
        trainer.train()
    assert "step 5: the training loss is nan" in str(caught.value)
    assert max(committed_steps(trainer), default=0) <= 4
