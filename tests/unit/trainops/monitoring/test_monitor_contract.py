"""Every registered metric logger keeps the same contract, and is chosen by ``kind``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apt.core.config.monitoring import EXTRAS, LoggerConfig
from apt.core.config.schema_walk import unwrap
from apt.core.errors import ConfigError
from apt.trainops.monitoring import LOGGERS, MetricLogger, build_logger

CONFIGS = {m.model_fields["kind"].default: m for m in unwrap(LoggerConfig)}


def test_every_config_kind_has_a_logger_and_back() -> None:
    assert (
        sorted(CONFIGS)
        == LOGGERS.names()
        == sorted(["console", "jsonl", "tensorboard", "wandb", "mlflow"])
    )
    assert set(EXTRAS) <= set(LOGGERS.names())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_each_logger_builds_from_its_default_config(kind: str, tmp_path: Path) -> None:
    logger = build_logger(CONFIGS[kind](), output_dir=tmp_path)
    assert isinstance(logger, MetricLogger) and logger.kind == kind
    assert LOGGERS.get(kind) is type(logger)
    assert logger.fix.strip() and "\n" not in logger.fix
    assert isinstance(type(logger).can_delete, bool)
    assert LOGGERS.summary(kind)  # a docstring that says what it is
    # Before start: nothing to resume, and finish() has nothing to close.
    assert json.loads(json.dumps(logger.state_dict())) == logger.state_dict() == {}
    logger.finish()


def test_an_unknown_kind_lists_the_valid_ones(tmp_path: Path) -> None:
    class Entry:
        kind = "tensorbored"

    with pytest.raises(ConfigError) as caught:
        build_logger(Entry(), output_dir=tmp_path)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "unknown metric logger 'tensorbored'" in message and "'tensorboard'" in message
    assert "console, jsonl, mlflow, tensorboard, wandb" in message


def test_building_every_logger_imports_no_backend_package(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from apt.core.config.monitoring import MonitoringConfig\n"
        "from apt.trainops.monitoring import build_monitor\n"
        "cfg = MonitoringConfig.model_validate({'tensorboard': True, 'wandb': True, "
        "'mlflow': True, 'console': True})\n"
        f"m = build_monitor(cfg, run_dir=Path({str(tmp_path)!r}), "
        f"output_dir=Path({str(tmp_path)!r}), enabled=True)\n"
        "assert len(m.active) == 5, m.active\n"
        "print(sorted(n for n in ('torch', 'wandb', 'mlflow', 'tensorboard') "
        "if n in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stderr
