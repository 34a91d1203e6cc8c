"""Shared fixtures: run every test from a scratch folder so run folders never pollute the repo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Shared test helpers (tiny_lm, ...): plain modules, since --import-mode=importlib puts no test
# folder on sys.path.
HELPERS = str(Path(__file__).resolve().parent / "helpers")
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """chdir into a fresh folder (profiles resolve through the package, not ./profiles)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("APT_PROFILE_PATH", raising=False)
    return tmp_path


@pytest.fixture(autouse=True)
def _no_stray_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for key in ("APT_FAULT_INJECT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if key in os.environ:
            monkeypatch.delenv(key)
    # The model store: never the user's own ~/.cache/apt/models.
    monkeypatch.setenv("APT_HOME", str(tmp_path_factory.mktemp("apt_home")))
