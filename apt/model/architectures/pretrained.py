"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors`` in a folder.

Nothing is unpickled: the config is JSON validated by :class:`ModelConfig`, the weights are
safetensors. Tied tensors are written once and restored to every name that shares them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from apt.core.config.model import ModelConfig
from apt.core.errors import CheckpointError
from apt.core.files import apply_umask

if TYPE_CHECKING:
    from apt.model.architectures.apt_model import APTModel

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_pretrained", "load_weights", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_COMPILE_PREFIX = "_orig_mod."

_M = TypeVar("_M", bound="APTModel")


def _shared_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of the state-dict entries grouped by the memory they share (tied weights)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            groups[(id(tensor),)] = [name]
            continue
        key = (tensor.data_ptr(), int(tensor.storage_offset()), *tensor.shape)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _tied_names(model: APTModel) -> set[str]:
    """Parameter names that alias an earlier-named parameter (tied weights), to skip."""
    first: dict[int, str] = {}
    tied: set[str] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        else:
            first[id(param)] = name
    return tied


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    apply_umask(tmp)
    os.replace(tmp, path)


def save_pretrained(
    model: APTModel, directory: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``.

    ``state`` replaces ``model.state_dict()`` (a full state gathered from a sharded model).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tied = _tied_names(model)
    state = model.state_dict() if state is None else state
    # One copy per shared tensor: the first name wins (embed_tokens.weight before lm_head.weight).
    # Ties come from the model's own parameters, since a state gathered from shards holds a
    # separate copy under every name.
    state = {name: t for name, t in state.items() if name not in tied}
    unique = {group[0]: state[group[0]] for group in _shared_groups(state)}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in unique.items()}
    config_text = json.dumps(model.config.model_dump(mode="json"), indent=2, sort_keys=True)
    _write_atomic(out / CONFIG_NAME, lambda p: p.write_text(config_text + "\n"))
    _write_atomic(
        out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"})
    )
    return out


def _read_config(path: Path) -> ModelConfig:
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}. "
            "Point at a folder written by model.save_pretrained(dir)."
        )
    try:
        return ModelConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, ValidationError
        detail = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else str(exc)
        raise CheckpointError(
            f"{path} is not a valid model config ({detail}). Re-save the model with "
            "model.save_pretrained(dir), or restore the file from a backup."
        ) from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: the weights are missing next to {CONFIG_NAME}. "
            "Re-save the model with model.save_pretrained(dir)."
        )
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({exc}). Re-save the model with "
            "model.save_pretrained(dir), or restore the file from a backup."
        ) from None
    # A torch.compile'd module prefixes every key; the plain model has none.
    return {k.removeprefix(_COMPILE_PREFIX): v for k, v in state.items()}


def load_weights(model: APTModel, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` strictly, filling tied names from the one stored copy.

    Raises:
        CheckpointError: keys or shapes differ from the model's.
    """
    expected = model.state_dict()
    state = dict(state)
    for group in _shared_groups(expected):
        present = [name for name in group if name in state]
        for name in group:
            if name not in state and present:
                state[name] = state[present[0]]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape (file vs model)", wrong),
            )
            if items
        ]
        raise CheckpointError(
            f"{source} does not match the model its {CONFIG_NAME} describes ({'; '.join(parts)}). "
            "Was it written by another version, or edited? "
            "Re-save it with model.save_pretrained(dir)."
        )
    model.load_state_dict(state, strict=True)


def load_pretrained(
    cls: type[_M], directory: str | Path, device: torch.device | str | None = None
) -> _M:
    """Build ``cls`` from ``directory/config.json`` and load ``directory/model.safetensors``.

    Raises:
        CheckpointError: the folder or a file is missing, corrupt or inconsistent.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder {folder} not found. Pass a folder written by model.save_pretrained(dir)."
        )
    config = _read_config(folder / CONFIG_NAME)
    state = _read_weights(folder / WEIGHTS_NAME)
    model = cls(config)
    load_weights(model, state, folder / WEIGHTS_NAME)
    if device is not None:
        model.to(device)
    return model
