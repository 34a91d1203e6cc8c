"""``profiles``, ``config`` and ``tasks``: look at profiles and plugins without training.

None of these imports torch unless a profile names a plugin that must be imported to be checked
(a callback or task with options, or one given by import path), so they answer in a fraction of
a second.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from apt.core.config import APTConfig, load_profile, profile_files, resolve_profile
from apt.core.config.devices import check_device_present
from apt.core.redact import redact

__all__ = ["check_device", "check_plugins", "cmd_config", "cmd_profiles", "cmd_tasks"]


def _where(path: Path) -> str:
    packaged = Path(__file__).resolve().parents[1] / "profiles"
    try:
        path.resolve().relative_to(packaged)
        return "packaged with APT"
    except ValueError:
        return str(path)


def provenance_lines(cfg: APTConfig) -> list[str]:
    """The resolved config as YAML, each value followed by where it came from; credentials in
    values (a URI's password, a ``token=`` parameter) are hidden."""
    lines: list[str] = []

    def walk(node: Any, prefix: str, indent: int) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            pad = "  " * indent
            if isinstance(value, dict) and value:
                lines.append(f"{pad}{key}:")
                walk(value, dotted, indent + 1)
            else:
                text = yaml.safe_dump({key: value}, default_flow_style=True, width=200).strip()
                lines.append(redact(f"{pad}{text[1:-1]:<48} # {cfg.origin_of(dotted)}"))

    walk(cfg.to_dict(), "", 0)
    return lines


def cmd_profiles(args: argparse.Namespace) -> int:
    if args.action == "list":
        found = profile_files()
        width = max((len(name) for name in found), default=0)
        for name, path in found.items():
            print(f"{name:<{width}}  {_where(path)}")
        return 0
    if not args.resolved:
        print(resolve_profile(args.profile).read_text(encoding="utf-8"), end="")
        return 0
    cfg = load_profile(args.profile, overrides=args.overrides)
    print(f"# {args.profile}: resolved from {cfg.source}")
    print("\n".join(provenance_lines(cfg)))
    return 0


def check_plugins(cfg: APTConfig) -> None:
    """Check the task and the callbacks a config names, importing only what must be built.

    Raises:
        ConfigError: an unknown name (with the nearest ones), an import path that does not
            import, or a bad option (named, with its place in the profile).
    """
    from apt.trainops.plugins import CALLBACKS, TASKS

    task = cfg.training.task
    if task.options or not TASKS.is_builtin(task.kind):
        from apt.trainops.engine.tasks import build_task

        build_task(task)
    if all(spec.name in CALLBACKS and not spec.options for spec in cfg.callbacks):
        return
    from apt.trainops.engine.callbacks import build_callbacks

    build_callbacks(
        cfg.callbacks,
        origin=lambda i: cfg.origin_of(f"callbacks.{i}"),
        sink=None,
        schedules=cfg.schedules,
        evaluation=cfg.eval,
    )


def check_device(cfg: APTConfig) -> None:
    """Refuse a ``training.device`` this machine does not have (torch is imported only when
    the config names ``cuda`` or ``mps``).

    Raises:
        ConfigError: naming ``training.device`` and the devices there are.
    """
    device = cfg.training.device
    if device in ("auto", "cpu"):
        return
    import torch

    check_device_present(
        device,
        cuda_devices=torch.cuda.device_count(),
        mps_available=torch.backends.mps.is_available(),
        where=cfg.origin_of("training.device"),
    )


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "schema":
        schema = APTConfig.model_json_schema()
        schema["properties"]["extends"] = {
            "type": "string",
            "description": "Parent profile whose values this file overrides.",
        }
        print(json.dumps(schema, indent=2))
        return 0
    cfg = load_profile(args.file, overrides=args.overrides)
    check_device(cfg)
    check_plugins(cfg)
    print(f"OK: {cfg.source} is a valid APT config (fingerprint {cfg.fingerprint()[:12]})")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from apt.trainops.plugins import TASKS

    names = TASKS.names()
    width = max(len(name) for name in names)
    for name in names:
        print(f"{name:<{width}}  {TASKS.summary(name)}")
    print(
        "\nPick one with --task NAME or training.task: NAME; a task of your own by import path: "
        "--task my_pkg.tasks:MyTask (importable from the working directory or PYTHONPATH)."
    )
    return 0
