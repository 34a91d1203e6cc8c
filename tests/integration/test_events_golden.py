"""A recording callback over a tiny real run: the exact event sequence, and Control requests
taking effect at the documented points."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from apt.trainops.engine import Callback, Control, Event, RunState, Trainer


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.out = nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(input_ids))  # (B, T, V)


class Counting(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": (torch.arange(6) + i) % 16}


class Recorder(Callback):
    """Records every event; optionally asks for things at given steps."""

    def __init__(self, requests: dict[tuple[str, int], str] | None = None) -> None:
        self.events: list[str] = []
        self.requests = requests or {}

    def record(self, name: str, state: RunState, control: Control) -> None:
        self.events.append(name)
        ask = self.requests.get((name, state.global_step))
        if ask == "stop":
            control.request_stop("test asked")
        elif ask == "save":
            control.request_save()
        elif ask == "eval":
            control.request_eval()


def _hook(name: str):  # type: ignore[no-untyped-def]
    def hook(self: Recorder, state: RunState, control: Control) -> None:
        self.record(name, state, control)

    return hook


for _event in Event:  # one real method per event, as a user callback would define them
    setattr(Recorder, _event.method_name, _hook(_event.value))


def run(tmp_path: Path, recorder: Recorder, **kwargs: object) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(
        model=TinyLM(),
        train_dataset=Counting(16),
        eval_dataset=Counting(4),
        batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=0.1,
        output_dir=str(tmp_path),
        save_interval=None,
        callbacks=[recorder],
        **kwargs,  # type: ignore[arg-type]
    )
    trainer.callbacks.callbacks = [recorder]  # only the recorder: the sequence is all we check
    trainer.callbacks._rebuild()
    trainer.train()
    return trainer


STEP = [
    "step_start",
    "batch_start",
    "before_backward",
    "after_backward",
    "batch_end",
    "batch_start",
    "before_backward",
    "after_backward",
    "batch_end",
    "before_optimizer_step",
    "after_optimizer_step",
    "step_end",
]
EVAL = ["eval_start", "eval_end"]


def test_golden_event_sequence(tmp_path: Path) -> None:
    recorder = Recorder()
    run(tmp_path, recorder, num_epochs=2)
    expected = [
        "train_start",
        *EVAL,
        "epoch_start",
        *STEP,
        *STEP,
        "epoch_end",
        *EVAL,
        "epoch_start",
        *STEP,
        *STEP,
        "epoch_end",
        *EVAL,
        "checkpoint_save",  # the final validation and save
        "train_end",
    ]
    assert recorder.events == expected


def test_resumed_run_fires_checkpoint_load_and_skips_nothing_else(tmp_path: Path) -> None:
    run(tmp_path, Recorder(), num_epochs=1)
    again = Recorder()
    run(tmp_path, again, num_epochs=2)  # a larger plan extends the finished run
    assert again.events[:3] == ["checkpoint_load", "train_start", "epoch_start"]
    assert again.events.count("step_start") == 2 and again.events[-1] == "train_end"


def test_stop_request_ends_the_run_after_that_step(tmp_path: Path) -> None:
    recorder = Recorder({("step_end", 3): "stop"})
    trainer = run(tmp_path, recorder, num_epochs=2)
    assert trainer.state.global_step == 3 and trainer.state.finished
    assert trainer.state.stop_reason == "test asked"
    tail = recorder.events[recorder.events.index("step_end", -15) :]
    # step 3 ends mid-epoch: no epoch_end; final eval and save, then train_end
    assert tail == ["step_end", *EVAL, "checkpoint_save", "train_end"]


def test_save_and_eval_requests_happen_right_after_step_end(tmp_path: Path) -> None:
    recorder = Recorder({("step_end", 1): "eval", ("step_end", 2): "save"})
    trainer = run(tmp_path, recorder, num_epochs=2, eval_interval=None)
    events = recorder.events
    first_step_end = events.index("step_end")
    assert events[first_step_end + 1 : first_step_end + 3] == EVAL
    second_step_end = events.index("step_end", first_step_end + 1)
    assert events[second_step_end + 1] == "checkpoint_save"
    assert (trainer.run_dir / "checkpoints" / "step-000000002" / "MANIFEST.json").is_file()
