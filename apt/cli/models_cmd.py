"""``models``: the local model store (:class:`apt.model.store.ModelStore`) on the command line.

    python -m apt models list                     # name, parameters, steps, final loss, size, date
    python -m apt models show tiny-code [--json]  # its model card
    python -m apt models remove tiny-code --yes   # delete it

The store is ``--store DIR``, else ``$APT_HOME``, else ``~/.cache/apt/models``; models get into
it with ``python -m apt export RUN_DIR --name NAME``. A name the store does not hold, or one
that is not a valid name, ends the command with exit code 2 and one line that lists the names
the store holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt.core.errors import ConfigError

if TYPE_CHECKING:
    from apt.model.store import ModelStore

__all__ = ["add_models_parser", "cmd_models"]

_ADD_HINT = "add one with: python -m apt export RUN_DIR --name NAME"


def add_models_parser(sub: Any) -> None:
    """Register ``models`` and its actions on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="DIR",
        help="the model store's folder (default: $APT_HOME, else ~/.cache/apt/models)",
    )
    models = sub.add_parser("models", help="list, show or remove the models of the local store")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    msub.add_parser(
        "list",
        parents=[common],
        help="the stored models: name, parameters, steps, final loss, size, date",
    )
    show = msub.add_parser("show", parents=[common], help="print a stored model's card")
    show.add_argument("name", metavar="NAME")
    show.add_argument("--json", action="store_true", help="print model_card.json instead")
    remove = msub.add_parser("remove", parents=[common], help="delete a stored model")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--yes", "-y", action="store_true", help="do not ask first")


def cmd_models(args: argparse.Namespace) -> int:
    """Run ``models ACTION``; the exit code (errors are raised: exit code 2)."""
    from apt.model.store import ModelStore

    store = ModelStore.of(Path(args.store).expanduser() if args.store else None)
    if args.action == "list":
        return _list(store)
    if args.action == "show":
        return _show(store, args.name, as_json=args.json)
    return _remove(store, args.name, yes=args.yes)


def _size(n: int) -> str:
    from apt.trainops.checkpoints.errors import human_bytes

    return human_bytes(n)


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _list(store: ModelStore) -> int:
    names = store.names()
    if not names:
        print(f"the local model store {store.root} is empty; {_ADD_HINT}")
        return 0
    header = ("NAME", "PARAMETERS", "STEPS", "FINAL LOSS", "SIZE", "DATE")
    rows = [header]
    for name in names:
        info = store.info(name)
        card = info.card
        created = card.get("created")
        rows.append(
            (
                name,
                _cell(card.get("parameters"), "{:,}"),
                _cell(card.get("steps"), "{:,}"),
                _cell(info.final_loss, "{:.4f}"),
                _size(info.size_bytes),
                created[:16].replace("T", " ") if isinstance(created, str) else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print(f"local model store: {store.root}")
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _show(store: ModelStore, name: str, *, as_json: bool) -> int:
    from apt.model.store import CARD_MARKDOWN, render_card

    info = store.info(name)
    if as_json:
        print(json.dumps(info.card, indent=2))
        return 0
    print(f"{info.path} ({_size(info.size_bytes)})\n")
    try:
        text = (info.path / CARD_MARKDOWN).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = render_card(info.card or {"name": name})
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _remove(store: ModelStore, name: str, *, yes: bool) -> int:
    info = store.info(name)  # a missing name fails before anything is asked
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(
                f"models remove {name}: pass --yes to remove it without asking (no terminal "
                "to ask on)"
            )
        answer = input(f"remove {name} ({_size(info.size_bytes)}) from {store.root}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    store.remove(name)
    print(f"removed {name} ({_size(info.size_bytes)}) from {store.root}")
    return 0
