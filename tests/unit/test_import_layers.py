"""Imports go one way: apt.core <- apt.model <- apt.trainops <- compat (apt_model)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: package -> prefixes it must never import
FORBIDDEN = {
    "apt/core": ("apt.model", "apt.trainops", "apt.cli", "apt_model"),
    "apt/model": ("apt.trainops", "apt.cli", "apt_model"),
    "apt/trainops": ("apt.cli", "apt_model"),
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, name in imported_modules(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert bad == []


def test_the_check_sees_real_imports() -> None:
    # Guard against a vacuous pass: the engine does import apt.core.
    engine = ROOT / "apt/trainops/engine/trainer.py"
    assert any(name.startswith("apt.core") for _, name in imported_modules(engine))
