"""A checkpoint whose hashes verify but whose trainer state the resume cannot use is corrupt:
the run falls back to the previous checkpoint, as for a bad hash."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_lm import BigramLM

from apt.trainops.engine import Trainer

DATA = [{"input_ids": (torch.arange(12) * (i % 5 + 1)) % 32} for i in range(32)]


def run(tmp_path: Path, max_steps: int) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(
        model=BigramLM(width=8, squash=False),
        train_dataset=DATA,
        batch_size=4,
        max_steps=max_steps,
        save_interval=2,
        output_dir=str(tmp_path),
        experiment_name="run",
    )
    trainer.train()
    return trainer


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(doc: dict[str, Any]) -> Any:
        target = doc
        *parents, last = path.split(".")
        for key in parents:
            target = target[key]
        target[last] = value
        return doc

    return edit


DAMAGE = {
    "a list": lambda doc: [doc],
    "a string step": _set("train.global_step", "4"),
    "a negative epoch": _set("train.epoch", -1),
    "a float cursor": _set("train.batch_in_epoch", 1.5),
    "no train section": lambda doc: {k: v for k, v in doc.items() if k != "train"},
    "train is a list": _set("train", [1, 2]),
    "an unknown counter": _set("train.steps_done", 3),
    "a missing counter": lambda doc: {**doc, "train": {"epoch": 0}},
    "text metrics": _set("train.metrics", {"val_loss": "low"}),
    "a string flag": _set("train.finished", "no"),
    "world size zero": _set("world_size", 0),
    "callbacks a list": _set("callbacks", []),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_malformed_trainer_state_falls_back_to_the_previous_checkpoint(
    tmp_path: Path, resign: Callable[..., Any], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = run(tmp_path, 4)
    newest = first.run_dir / "checkpoints" / "step-000000004"
    state_file = newest / "trainer_state.json"
    state_file.write_text(json.dumps(DAMAGE[damage](json.loads(state_file.read_text()))))
    resign(newest)
    with caplog.at_level(logging.INFO):
        resumed = run(tmp_path, 6)
    assert "trainer_state.json" in caplog.text and "corrupt" in caplog.text
    resumes = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert len(resumes) == 1 and resumes[0].endswith("step 2)"), resumes
    assert resumed.state.global_step == 6
    reference = run(tmp_path / "ref", 6)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
