"""Fixtures of the monitoring tests: W&B offline in the test's folder, a shared MLflow store."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _apt_records_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's console setup stops the ``apt`` logger propagating; caplog listens at the
    root, so these tests need it propagating whatever ran before them."""
    monkeypatch.setattr(logging.getLogger("apt"), "propagate", True)


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline and silent, its config and cache folders inside ``tmp_path`` (so a test
    can search every file it wrote); returns ``tmp_path``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name, folder in (
        ("WANDB_CONFIG_DIR", ".wandb-config"),
        ("WANDB_CACHE_DIR", ".wandb-cache"),
        ("WANDB_DATA_DIR", ".wandb-data"),
        ("WANDB_ARTIFACT_DIR", ".wandb-artifacts"),
    ):
        monkeypatch.setenv(name, str(tmp_path / folder))
    return tmp_path


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The URI of one MLflow sqlite store for the session (creating one costs ~1.5 s); each
    test uses an experiment of its own."""
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    assert not missing, (
        f"MLflow's sqlite store (the default of monitoring.loggers[mlflow]) needs {missing}: "
        "mlflow-skinny does not install them; the mlflow extra must"
    )
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def mlflow_experiment(request: pytest.FixtureRequest) -> str:
    """An experiment name of this test's own."""
    return f"apt-{request.node.name}"
