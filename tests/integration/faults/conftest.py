"""Fixtures of the fault-injection suite: the suite's profile, the golden run, scenario results.

pytest runs with ``--import-mode=importlib``, which does not put test folders on ``sys.path``;
the helpers (``faults_harness``, ``faults_scenarios``) and the callback the CLI runs import
(``faults_inject``) are plain modules of this folder, so it goes on the path here (and on the
``PYTHONPATH`` of every run).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from faults_harness import Case, Golden, run_golden, write_profile  # noqa: E402
from faults_scenarios import SCENARIOS, outcome, run_scenarios  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(name): the test checks the result of the named fault scenario"
    )


@pytest.fixture(scope="session")
def faults_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def faults_profile(faults_root: Path) -> Path:
    return write_profile(faults_root)


@pytest.fixture(scope="session")
def golden(faults_root: Path, faults_profile: Path) -> Golden:
    """The uninterrupted run of the suite's profile, once per session (alone, so its timing
    is not disturbed)."""
    return run_golden(Case(faults_root / "golden", faults_profile))


@pytest.fixture(scope="session")
def scenario_results(
    request: pytest.FixtureRequest, golden: Golden, faults_root: Path, faults_profile: Path
) -> dict[str, Any]:
    """Every scenario the selected tests name, run side by side on first use."""
    wanted = {
        marker.args[0]: None
        for item in request.session.items
        for marker in item.iter_markers("scenario")
    }
    unknown = sorted(set(wanted) - set(SCENARIOS))
    assert not unknown, f"tests name unregistered scenarios: {unknown}"
    return run_scenarios(list(wanted), root=faults_root, profile=faults_profile, golden=golden)


@pytest.fixture
def result(request: pytest.FixtureRequest, scenario_results: dict[str, Any]) -> Any:
    """The result of the scenario this test's ``scenario`` marker names."""
    marker = request.node.get_closest_marker("scenario")
    assert marker is not None, "a test using `result` needs @pytest.mark.scenario(name)"
    return outcome(scenario_results[marker.args[0]])
