"""Scenarios: the subprocess work of each fault case, run two at a time before the checks.

Almost all of the suite's time is spent in CLI subprocesses (each one mostly Python and torch
start-up), and the cases are independent, so the work of every case a session selects runs in
a pool of two threads (CI has 2 cores) as soon as the first check needs it; the tests then
only assert. A test module registers each case's work::

    @scenario("double-resume", runs=3)
    def double_resume(ctx: Context) -> Case: ...

and a test reads it through the marker and the ``result`` fixture::

    @pytest.mark.scenario("double-resume")
    def test_killed_twice(result: Case, golden: Golden) -> None: ...

An exception in a scenario fails only the tests that read it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from faults_harness import Case, Golden

__all__ = ["SCENARIOS", "Context", "outcome", "run_scenarios", "scenario"]

F = TypeVar("F", bound=Callable[..., Any])

#: name -> (work, number of CLI runs it makes: the longest start first).
SCENARIOS: dict[str, tuple[Callable[[Context], Any], int]] = {}


@dataclass(frozen=True)
class Context:
    """What a scenario gets: a folder of its own, the suite's profile, the golden run."""

    root: Path
    profile: Path
    golden: Golden

    def case(self, *overrides: str) -> Case:
        """A fresh case in this scenario's folder."""
        return Case(self.root / "case", self.profile, overrides)

    def copy_of_golden(self) -> Case:
        """A case whose run folder starts as a copy of the finished golden run."""
        return self.golden.case.copy_to(self.root / "case")


def scenario(name: str, *, runs: int) -> Callable[[F], F]:
    """Register the decorated ``work(ctx)`` under ``name`` (``runs``: CLI runs it makes)."""

    def register(work: F) -> F:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        SCENARIOS[name] = (work, runs)
        return work

    return register


def run_scenarios(
    names: list[str], *, root: Path, profile: Path, golden: Golden, workers: int = 2
) -> dict[str, Any]:
    """Run the named scenarios side by side; each result, or the exception it raised."""
    order = sorted(names, key=lambda n: -SCENARIOS[n][1])
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fault-scenario") as pool:
        futures = {
            name: pool.submit(SCENARIOS[name][0], Context(root / name, profile, golden))
            for name in order
        }
        results: dict[str, Any] = {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as exc:  # handed to the tests of this scenario by outcome()
                results[name] = exc
    return results


def outcome(result: Any) -> Any:
    """A scenario's result, re-raising the exception it ended with."""
    if isinstance(result, Exception):
        raise result
    return result
