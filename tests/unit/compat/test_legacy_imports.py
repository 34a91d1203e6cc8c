"""Legacy ``apt_model`` imports keep working, each with one DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

import apt.trainops.engine as engine
from apt.trainops.engine.curriculum import ScheduleExecutor


@pytest.mark.parametrize(
    "module, names",
    [
        (
            "apt_model.training.callbacks",
            [
                "ScheduleExecutor",
                "ScheduleCallback",
                "CallbackManager",
                "EntropyBasedVotingCallback",
                "TrainingCallback",
            ],
        ),
        ("apt_model.training.trainer", ["Trainer", "Finetuner"]),
    ],
)
def test_legacy_module_reexports_and_warns(module: str, names: list[str]) -> None:
    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match=f"{module} is deprecated"):
        legacy = importlib.import_module(module)
    for name in names:
        assert hasattr(legacy, name), name


def test_legacy_names_are_the_new_objects() -> None:
    sys.modules.pop("apt_model.training.callbacks", None)
    with pytest.warns(DeprecationWarning):
        from apt_model.training.callbacks import ScheduleExecutor as Legacy
        from apt_model.training.callbacks import TrainingCallback
    assert Legacy is ScheduleExecutor and TrainingCallback is engine.Callback
