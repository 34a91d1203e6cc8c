"""The local model store: finished models kept by name, each with its model card.

    store = ModelStore()                         # $APT_HOME, else ~/.cache/apt/models
    store.save("tiny-code", model)               # <root>/tiny-code/, with its card
    store.names()                                # ['tiny-code']
    model = APTModel.from_pretrained("tiny-code")   # a folder, else a name in the store

Each entry is a folder ``<root>/<name>/`` as ``save_pretrained`` writes it (``config.json``,
``model.safetensors``, the tokenizer) and its model card: ``model_card.json`` (for programs)
and ``MODEL_CARD.md`` (for people). A name is 1-100 of ``A-Z a-z 0-9 . _ -`` starting with a
letter or digit, so it is never a path and never one of the store's hidden staging folders.

Writing is all or nothing: the files go into ``<root>/.<name>.tmp-<pid>`` and the folder is
renamed into place once every file is written, so no reader ever sees a half-written model.
Replacing a name (``overwrite=True``) moves the old folder aside first and deletes it after;
between those two renames the name is briefly absent. :func:`default_store_root` is the one
place APT reads the ``APT_HOME`` variable; every API also takes the store explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apt.core.errors import CheckpointError, ModelStoreError
from apt.core.version import __version__

if TYPE_CHECKING:
    import torch

    from apt.model.architectures.apt_model import APTModel

__all__ = [
    "CARD_JSON",
    "CARD_MARKDOWN",
    "STORE_ENV",
    "ModelStore",
    "StoredModel",
    "TrainingSummary",
    "check_model_name",
    "default_store_root",
    "model_card",
    "render_card",
]

#: The environment variable that names the store's folder.
STORE_ENV = "APT_HOME"
CARD_JSON = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
#: Version of the ``model_card.json`` layout.
CARD_FORMAT = 1
_CONFIG = "config.json"  # what save_pretrained writes first: a folder holding it is a model
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_HOW_TO_ADD = (
    "python -m apt export RUN_DIR --name {name} (or ArtifactManager.save_model(model, "
    "name='{name}'))"
)


def default_store_root() -> Path:
    """``$APT_HOME`` when set (``~`` expanded), else ``~/.cache/apt/models``."""
    home = os.environ.get(STORE_ENV, "")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "apt" / "models"


def check_model_name(name: str) -> str:
    """``name`` when it can name a model in the store.

    Raises:
        ModelStoreError: it is empty, too long, holds a path separator or another character
            outside ``A-Z a-z 0-9 . _ -``, or starts with ``.``, ``_`` or ``-``.
    """
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise ModelStoreError(
        f"{name!r} is not a model name: use 1-100 letters, digits, '.', '_' or '-', starting "
        "with a letter or digit, and no path separators (e.g. 'tiny-code-v2'). To load a "
        "folder, pass its path."
    )


@dataclass(frozen=True)
class TrainingSummary:
    """What a training run tells a model card (filled by the code that knows the run).

    Attributes:
        run: the run folder the model came from.
        data: the data source, described in one line (``python_stdlib``, ``shards: /data``).
        steps: the optimizer steps the model was trained for.
        final_metrics: the last logged value of each metric (None where it was not finite).
        checkpoint: the checkpoint folder exported, when not the run's ``final_model``.
    """

    run: str | None = None
    data: str | None = None
    steps: int | None = None
    final_metrics: dict[str, float | None] = field(default_factory=dict)
    checkpoint: str | None = None


def model_card(
    model: APTModel,
    *,
    name: str,
    source: str | Path | None = None,
    training: TrainingSummary | None = None,
) -> dict[str, Any]:
    """The ``model_card.json`` of ``model`` stored as ``name`` (``source``: where it came from)."""
    tokenizer = getattr(model, "tokenizer", None)
    return {
        "format": CARD_FORMAT,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "apt_version": __version__,
        "parameters": model.num_parameters(),
        "tokenizer": tokenizer.name if tokenizer is not None else None,
        "source": None if source is None else str(source),
        **asdict(training or TrainingSummary()),
        "config": model.config.model_dump(mode="json"),
    }


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def render_card(card: dict[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for people (the same facts as ``model_card.json``)."""
    name = card.get("name", "?")
    facts = [
        ("parameters", card.get("parameters")),
        ("tokenizer", card.get("tokenizer")),
        ("steps", card.get("steps")),
        ("data", card.get("data")),
        ("run", card.get("run")),
        ("checkpoint", card.get("checkpoint")),
        ("source", card.get("source")),
        ("created", card.get("created")),
        ("apt version", card.get("apt_version")),
    ]
    lines = [f"# {name}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_value(value)} |" for key, value in facts if value is not None]
    metrics = card.get("final_metrics") or {}
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_value(value)} |" for key, value in sorted(metrics.items())]
    config = json.dumps(card.get("config", {}), indent=2, sort_keys=True)
    lines += ["", "## Config", "", "```json", config, "```", "", "## Use", "", "```python"]
    lines += ["from apt.model import APTModel", f'model = APTModel.from_pretrained("{name}")']
    return "\n".join([*lines, "```", ""])


@dataclass(frozen=True)
class StoredModel:
    """One model in the store, as :meth:`ModelStore.info` describes it.

    Attributes:
        name: its name.
        path: its folder.
        card: its ``model_card.json`` ({} when missing or unreadable).
        size_bytes: the bytes of all its files.
    """

    name: str
    path: Path
    card: dict[str, Any]
    size_bytes: int

    @property
    def final_loss(self) -> float | None:
        """The card's last ``val_loss``, else its last ``train_loss`` (None when neither)."""
        metrics = self.card.get("final_metrics") or {}
        loss = metrics.get("val_loss", metrics.get("train_loss"))
        return loss if isinstance(loss, int | float) else None


def _discard(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


class ModelStore:
    """The models kept under one folder, by name (see the module docstring).

    Args:
        root: the store's folder (created on the first save); default
            :func:`default_store_root`.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_store_root()

    @classmethod
    def of(cls, store: ModelStore | str | Path | None) -> ModelStore:
        """``store`` when it is a store; else the store at that folder (None: the default)."""
        return store if isinstance(store, ModelStore) else cls(store)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def path(self, name: str) -> Path:
        """The folder of ``name`` (whether it exists or not).

        Raises:
            ModelStoreError: ``name`` is not a valid name (:func:`check_model_name`).
        """
        return self.root / check_model_name(name)

    def names(self) -> list[str]:
        """The names of the models the store holds, sorted (none when it does not exist)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _NAME.fullmatch(p.name) and (p / _CONFIG).is_file()
        )

    def info(self, name: str) -> StoredModel:
        """What the store holds under ``name``.

        Raises:
            ModelStoreError: an invalid name, or none the store holds.
        """
        folder = self._existing(name)
        try:
            card = json.loads((folder / CARD_JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            card = {}
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        return StoredModel(name, folder, card if isinstance(card, dict) else {}, size)

    def remove(self, name: str) -> Path:
        """Delete ``name`` from the store (moved aside first, so it goes at once); its old path.

        Raises:
            ModelStoreError: an invalid name, none the store holds, or it cannot be deleted.
        """
        folder = self._existing(name)
        doomed = self.root / f".{name}.old-{os.getpid()}"
        try:
            os.replace(folder, doomed)
        except OSError as exc:
            raise self._os_error(f"could not remove {name!r} from", exc) from None
        try:
            _discard(doomed)
        except OSError as exc:
            raise ModelStoreError(
                f"removed {name!r} from the local model store {self.root}, but its files could "
                f"not all be deleted ({exc.strerror or exc}): delete {doomed} by hand."
            ) from None
        return folder

    def resolve(self, name_or_dir: str | Path) -> Path:
        """The model folder ``name_or_dir`` names: an existing folder wins; else a store name.

        Raises:
            ModelStoreError: a name the store does not hold (the message lists those it does).
            CheckpointError: a path that is not a folder and cannot be a name.
        """
        path = Path(name_or_dir).expanduser()
        if path.is_dir():
            return path
        text = str(name_or_dir)
        if _NAME.fullmatch(text):
            return self._existing(text, folder=path)
        raise CheckpointError(
            f"model folder {path} not found. Pass a folder written by model.save_pretrained(dir)"
            f", or the name of a model in the local store {self.root} ({self._listing()})."
        )

    def save(
        self,
        name: str,
        model: APTModel,
        *,
        overwrite: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        source: str | Path | None = None,
        training: TrainingSummary | None = None,
    ) -> Path:
        """Write ``model`` (``save_pretrained``) and its card into the store as ``name``.

        Args:
            name: the name (:func:`check_model_name`).
            model: an APT model (it has ``save_pretrained`` and a ``config``).
            overwrite: replace a model stored under ``name``; without it, that is an error.
            state_dict: weights to write instead of the model's own (gathered from shards).
            source: where the model came from, for the card.
            training: what its run tells the card.

        Returns:
            The model's folder in the store.

        Raises:
            ModelStoreError: an invalid or taken name, a model that is not an APT model, or a
                write that failed (nothing under ``name`` changed then).
        """
        if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
            raise ModelStoreError(
                f"cannot store a {type(model).__name__} as {name!r}: the store holds APT models "
                "(APTModel, APTLargeModel). Save other modules with ArtifactManager.save_model("
                "model, 'folder') instead."
            )
        card = model_card(model, name=check_model_name(name), source=source, training=training)

        def write(folder: Path) -> None:
            model.save_pretrained(folder, state_dict=state_dict)
            (folder / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
            (folder / CARD_MARKDOWN).write_text(render_card(card), encoding="utf-8")

        return self._publish(name, write, overwrite=overwrite)

    def _publish(self, name: str, write: Callable[[Path], None], *, overwrite: bool) -> Path:
        """Run ``write`` into a staging folder, then rename it into place as ``name``."""
        target = self.path(name)
        self._refuse_taken(target, overwrite)
        staging = self.root / f".{name}.tmp-{os.getpid()}"
        old = self.root / f".{name}.old-{os.getpid()}"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write(staging)
            self._refuse_taken(target, overwrite)  # another process may have saved meanwhile
            replaced = os.path.lexists(target)
            if replaced:
                os.replace(target, old)
            try:
                os.replace(staging, target)
            except OSError:
                if replaced:
                    os.replace(old, target)  # put the old model back under its name
                raise
            if replaced:
                with contextlib.suppress(OSError):  # the new model is in place: debris is hidden
                    _discard(old)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._os_error(f"could not save {name!r} into", exc) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _refuse_taken(self, target: Path, overwrite: bool) -> None:
        if os.path.lexists(target) and not overwrite:
            raise ModelStoreError(
                f"the local model store {self.root} holds {target.name!r} already. Pass "
                "overwrite=True (--force on the command line) to replace it, or choose "
                "another name."
            )

    def _existing(self, name: str, folder: Path | None = None) -> Path:
        path = self.path(name)
        if path.is_dir():
            return path
        here = f", and there is no folder {folder} here" if folder is not None else ""
        raise ModelStoreError(
            f"no model named {name!r} in the local model store {self.root} ({self._listing()})"
            f"{here}. Add one with {_HOW_TO_ADD.format(name=name)}, or set {STORE_ENV} to the "
            "store that holds it."
        )

    def _listing(self) -> str:
        names = self.names()
        if not names:
            return "it is empty"
        shown = ", ".join(names[:20])
        return f"it holds: {shown}{f' and {len(names) - 20} more' if len(names) > 20 else ''}"

    def _os_error(self, what: str, exc: OSError) -> ModelStoreError:
        return ModelStoreError(
            f"{what} the local model store {self.root}: {exc.strerror or exc} "
            f"({exc.filename or self.root}); nothing under that name changed. Free space or fix "
            f"the folder's permissions, or set {STORE_ENV} to another folder."
        )
