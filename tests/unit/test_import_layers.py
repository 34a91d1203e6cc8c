"""Imports go one way: apt.core <- apt.model <- apt.trainops <- compat (apt_model)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: The legacy layer: apt/ never imports it (compat/apt_model is installed as ``apt_model``).
LEGACY = ("apt_model", "compat")

#: package -> prefixes it must never import
FORBIDDEN = {
    "apt/core": ("apt.model", "apt.trainops", "apt.cli", *LEGACY),
    "apt/model": ("apt.trainops", "apt.cli", *LEGACY),
    "apt/trainops": ("apt.cli", *LEGACY),
    "apt": LEGACY,
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


def _names_legacy(text: str) -> bool:
    return any(text == p or text.startswith((f"{p}.", f"{p}:")) for p in LEGACY)


def test_apt_names_no_legacy_module_in_strings() -> None:
    # Lazy imports name their modules in strings (apt.trainops.engine's _HOMES, plugin tables).
    bad = [
        f"{path.relative_to(ROOT)}:{node.lineno} names {node.value!r}"
        for path in sorted((ROOT / "apt").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if _names_legacy(node.value)
    ]
    assert bad == []


def test_the_string_check_tells_legacy_names_from_apt_ones() -> None:
    assert _names_legacy("apt_model.training.callbacks") and _names_legacy("compat.apt_model")
    assert not _names_legacy("apt.model.architectures.apt_model")
    assert not _names_legacy("JSON-compatible")


def test_importing_all_of_apt_loads_no_legacy_module() -> None:
    # Every module of apt/, imported for real in a fresh interpreter: none pulls in apt_model.
    code = (
        "import importlib, pkgutil, sys, apt\n"
        "failed = []\n"
        "for info in pkgutil.walk_packages(apt.__path__, 'apt.'):\n"
        "    try:\n"
        "        importlib.import_module(info.name)\n"
        "    except ImportError as exc:  # an optional extra that is not installed\n"
        "        failed.append(f'{info.name}: {exc}')\n"
        "legacy = sorted(m for m in sys.modules if m.split('.')[0] in ('apt_model', 'compat'))\n"
        "print(len([m for m in sys.modules if m.startswith('apt.')]), legacy, failed)\n"
        "sys.exit(1 if legacy else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    loaded = int(out.stdout.split()[0])
    assert loaded > 50, out.stdout  # the walk really imported the package


#: What ``from apt import Trainer`` must not import: each costs start-up time (together about
#: a second on two cores) that a run pays only when it uses them (DCP at its first checkpoint,
#: FSDP and DTensor when it shards, the trackers and matplotlib when configured). (torch itself
#: imports FSDP with torch._dynamo when the first optimizer is built.)
HEAVY_ON_DEMAND = (
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "tensorboard",
    "wandb",
    "mlflow",
    "matplotlib",
)


def test_the_trainer_imports_nothing_heavy_it_does_not_use_yet() -> None:
    code = (
        "import sys\n"
        "from apt import Trainer, load_profile\n"
        f"heavy = {HEAVY_ON_DEMAND!r}\n"
        "print(sorted(m for m in sys.modules if m in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_apt_loads_without_garbage_collections_and_leaves_the_collector_as_it_was() -> None:
    """After ``import torch`` a collection of the older generations walks every object torch
    made (a full one cost about 0.1 s of the import on 2 cores): none runs while APT loads,
    only the youngest generation's when the collector resumes. A collector the caller turned
    off stays off."""
    code = (
        "import gc, torch\n"
        "generations = []\n"
        "gc.callbacks.append(\n"
        "    lambda phase, info: generations.append(info['generation']) if phase == 'start' "
        "else None\n"
        ")\n"
        "from apt import Trainer\n"
        "print(sorted(set(generations)), gc.isenabled())\n"
        "gc.disable()\n"
        "from apt import Finetuner\n"
        "print(gc.isenabled())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] in (["[0] True", "False"], ["[] True", "False"]), out.stdout
