"""``monitoring:`` and ``eval.monitor``: the two spellings of the loggers, a missing extra
refused at load time with its pip line, and one notion of "best" for retention."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from apt.core.config import config_from_dict, load_profile
from apt.core.errors import ConfigError


def kinds(data: dict[str, object]) -> list[str]:
    return [entry.kind for entry in config_from_dict({"monitoring": data}).monitoring.loggers]


def test_the_switch_form_and_the_list_form_agree() -> None:
    assert kinds({"tensorboard": True, "wandb": True, "mlflow": True}) == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    assert kinds({"loggers": [{"kind": "mlflow", "experiment": "e"}], "mlflow": True}) == ["mlflow"]
    assert kinds({"tensorboard": False}) == []


def test_a_logger_listed_twice_or_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"monitoring.loggers: lists wandb more than once"):
        kinds({"loggers": [{"kind": "wandb"}, {"kind": "wandb"}]})
    with pytest.raises(ConfigError, match=r"monitoring.loggers.0.*'tensorboard'"):
        kinds({"loggers": [{"kind": "tensorbord"}]})
    with pytest.raises(ConfigError, match=r"monitoring.loggers.0.projekt: unknown key"):
        kinds({"loggers": [{"kind": "wandb", "projekt": "p"}]})


def test_switches_must_be_booleans_and_jsonl_cannot_be_switched_off() -> None:
    with pytest.raises(ConfigError, match=r"wandb: must be true or false"):
        kinds({"wandb": "offline"})
    with pytest.raises(ConfigError, match=r"metrics.jsonl is always written"):
        kinds({"jsonl": False})


@pytest.mark.parametrize("kind, module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_extra_is_a_config_error_naming_its_pip_line(
    kind: str, module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    profile = tmp_path / "p.yaml"
    profile.write_text(f"monitoring:\n  {kind}: true\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_profile(profile)
    message = str(error.value)
    assert str(profile) in message and "monitoring.loggers" in message
    assert f'pip install "apt-transformer[{kind}]"' in message


def test_eval_monitor_ranks_checkpoints_unless_they_say_otherwise() -> None:
    cfg = config_from_dict({"eval": {"monitor": "val_accuracy", "mode": "max"}})
    assert (cfg.training.checkpoints.best_metric, cfg.training.checkpoints.best_mode) == (
        "val_accuracy",
        "max",
    )
    own = {"training": {"checkpoints": {"best_metric": "val_bpb"}}}
    cfg = config_from_dict({"eval": {"monitor": "val_accuracy", "mode": "max"}, **own})
    assert (cfg.training.checkpoints.best_metric, cfg.training.checkpoints.best_mode) == (
        "val_bpb",
        "max",
    )
    plain = config_from_dict({})
    assert (plain.eval.monitor, plain.eval.mode) == ("val_loss", "min")
    assert plain.training.checkpoints.best_metric == "val_loss"
