"""Legacy ``apt_model`` modules: each warns once, naming its new home; unchanged names are the
2.0 objects themselves, changed ones are thin adapters over them."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

import apt.core.config
import apt.model
import apt.trainops.engine as engine

#: legacy module -> (the new import path its warning names, the names it provides)
LEGACY_MODULES = {
    "apt_model.training.callbacks": (
        "apt.trainops.engine",
        [
            "lerp",
            "cosine_anneal",
            "get_interpolator",
            "ScheduleExecutor",
            "TrainingCallback",
            "ScheduleCallback",
            "EntropyBasedVotingCallback",
            "CallbackManager",
        ],
    ),
    "apt_model.training.trainer": ("apt.trainops.engine", ["Trainer", "Finetuner", "train_model"]),
    "apt_model.config": ("apt.core.config", ["APTConfig", "from_yaml", "translate_legacy"]),
    "apt_model.modeling.apt_model": ("apt.model", ["APTModel", "APTLargeModel"]),
}


def fresh_import(module: str) -> tuple[object, list[warnings.WarningMessage]]:
    """Import ``module`` anew (every legacy module forgotten first, so one that another imports
    would warn as well) and return it with the ``apt_model`` warnings it raised."""
    for name in LEGACY_MODULES:
        sys.modules.pop(name, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = importlib.import_module(module)
    return legacy, [w for w in caught if "apt_model" in str(w.message)]


@pytest.mark.parametrize("module", sorted(LEGACY_MODULES))
def test_each_legacy_module_warns_once_naming_its_new_home(module: str) -> None:
    new, names = LEGACY_MODULES[module]
    legacy, caught = fresh_import(module)
    assert [(w.category, str(w.message)) for w in caught] == [
        (DeprecationWarning, f"{module} is deprecated; import from {new} instead")
    ]
    assert sorted(legacy.__all__) == sorted(names)  # type: ignore[attr-defined]
    for name in names:
        assert hasattr(legacy, name), name
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        importlib.import_module(module)
    assert again == []  # once per module, not per import


def test_the_legacy_packages_themselves_hold_nothing_and_do_not_warn() -> None:
    for package in ("apt_model", "apt_model.training", "apt_model.modeling"):
        sys.modules.pop(package, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importlib.import_module(package)
        assert [str(w.message) for w in caught if "apt_model" in str(w.message)] == []


def test_unchanged_names_are_the_new_objects() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from apt_model.config import APTConfig
        from apt_model.modeling.apt_model import APTLargeModel, APTModel
        from apt_model.training.trainer import Finetuner, Trainer
    assert APTConfig is apt.core.config.APTConfig
    assert APTModel is apt.model.APTModel and APTLargeModel is apt.model.APTLargeModel
    assert Trainer is engine.Trainer and Finetuner is engine.Finetuner


def test_changed_names_are_adapters_the_engine_accepts() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from apt_model.training import callbacks as legacy
    # 1.x signatures differ from the 2.0 classes of the same name: adapters, not aliases.
    from apt.trainops.engine.callbacks import ScheduleCallback
    from apt.trainops.engine.curriculum import ScheduleExecutor

    assert legacy.ScheduleExecutor is not ScheduleExecutor
    assert legacy.ScheduleCallback is not ScheduleCallback
    assert legacy.CallbackManager is not engine.CallbackManager
    # ... but every 1.x callback is a 2.0 Callback, so Trainer(callbacks=[...]) takes it.
    for cls in (
        legacy.TrainingCallback,
        legacy.ScheduleCallback,
        legacy.EntropyBasedVotingCallback,
    ):
        assert issubclass(cls, engine.Callback), cls
