"""``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors`` in a folder,
and the model's tokenizer beside them when it has one (``apt_tokenizer.json``, ``tokenizer.json``).
``from_pretrained`` also takes the name of a model in the local store (:mod:`apt.model.store`).

Nothing is unpickled: the config is JSON validated by :class:`ModelConfig`, the weights are
safetensors. Tied tensors are written once and restored to every name that shares them.

Loading refuses, before allocating anything, what could not be a model folder: a file that is
not a regular file (a FIFO never blocks the reader), a ``config.json`` over
:data:`CONFIG_MAX_BYTES` or nested too deeply to parse, a config that describes more parameters
than ``model.safetensors`` holds values (:func:`config_parameters`), or RoPE tables over
:data:`MAX_ROPE_ENTRIES`. Links are followed (a hub cache links its files into place). Weights
that hold NaN or infinite values load, with a warning naming them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from apt.core.config.model import ModelConfig
from apt.core.errors import CheckpointError
from apt.core.files import apply_umask
from apt.model.store import ModelStore
from apt.model.tokenizers import load_tokenizer, save_tokenizer

if TYPE_CHECKING:
    from apt.model.architectures.apt_model import APTModel

__all__ = [
    "CONFIG_MAX_BYTES",
    "CONFIG_NAME",
    "MAX_ROPE_ENTRIES",
    "WEIGHTS_NAME",
    "config_parameters",
    "load_pretrained",
    "load_weights",
    "save_pretrained",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: A ``config.json`` larger than this is refused (a model config is about 1 KB).
CONFIG_MAX_BYTES = 1 << 20
#: RoPE tables (``max_seq_len`` x head size entries, built in float64, kept as float32 cos and
#: sin: 16 bytes per entry while built) larger than this are refused: 2^28 entries, 4 GiB.
MAX_ROPE_ENTRIES = 1 << 28
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
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, out)
    return out


def _read_regular(path: Path, limit: int | None = None) -> bytes | None:
    """The bytes of ``path`` (None when ``limit`` is None: only checked), if it is a regular
    file; opened non-blocking, so a FIFO is refused instead of waited on.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a regular file, or larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(
            f"{path} is not a regular file (a folder, FIFO or device). Point at a folder "
            "written by model.save_pretrained(dir)."
        )
    with os.fdopen(fd, "rb") as fh:
        if limit is None:
            return None
        if st.st_size > limit:
            raise CheckpointError(
                f"{path} is {st.st_size} bytes; a model config is about 1 KB (limit "
                f"{limit} bytes). It is not a config written by model.save_pretrained(dir)."
            )
        return fh.read(limit + 1)


def _read_config(path: Path) -> ModelConfig:
    try:
        data = _read_regular(path, CONFIG_MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"{path} not found: a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME}. "
            "Point at a folder written by model.save_pretrained(dir)."
        ) from None
    assert data is not None
    try:
        config = ModelConfig.model_validate(json.loads(data))
    except RecursionError:
        raise CheckpointError(
            f"{path} is not a valid model config (nested too deeply to parse). Re-save the "
            "model with model.save_pretrained(dir), or restore the file from a backup."
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, ValidationError
        detail = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else str(exc)
        raise CheckpointError(
            f"{path} is not a valid model config ({detail}). Re-save the model with "
            "model.save_pretrained(dir), or restore the file from a backup."
        ) from None
    if config.vocab_size == "auto":
        raise CheckpointError(
            f"{path}: vocab_size is 'auto', which a saved model cannot be (its embedding has a "
            "size). Write the number of rows of model.safetensors' embed_tokens.weight there."
        )
    return config


def config_parameters(config: ModelConfig) -> int:
    """The parameters the model of ``config`` has, each shared tensor counted once (align
    reference copies, buffers and switch flags are not counted): a lower bound on the values
    its ``model.safetensors`` stores. Computed from the sizes, without building anything."""
    if config.vocab_size == "auto":
        raise ValueError("model.vocab_size: auto has no size yet; resolve it first")
    D, V, F = config.hidden_size, config.vocab_size, config.mlp_hidden_size
    Dh = D // config.num_heads
    attention = 2 * D * config.num_heads * Dh + 2 * D * config.kv_heads * Dh  # q, o; k, v
    block = attention + 3 * D * F + 2 * D  # + SwiGLU (gate, up, down) + two RMSNorms
    total = V * D * (1 if config.tie_embeddings else 2) + config.num_layers * block + D
    if config.moe is not None:  # an MoE block keeps its dense MLP beside router and experts
        E = config.moe.num_experts
        total += (config.num_layers // config.moe.every_n_layers) * (D * E + 3 * E * D * F)
    return total


def _stored_values(path: Path) -> int:
    """How many values ``model.safetensors`` holds, from its header only.

    Raises:
        CheckpointError: missing, not a regular file, or not a valid safetensors file.
    """
    try:
        _read_regular(path)
        with safe_open(str(path), framework="pt") as fh:
            return sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())  # noqa: SIM118
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(
            f"{path} not found: the weights are missing next to {CONFIG_NAME}. "
            "Re-save the model with model.save_pretrained(dir)."
        ) from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({exc}). Re-save the model with "
            "model.save_pretrained(dir), or restore the file from a backup."
        ) from None


def _check_sizes(config: ModelConfig, config_path: Path, weights: Path) -> None:
    """Refuse, before anything is allocated, a config the weights file cannot fill.

    Raises:
        CheckpointError: naming ``config.json`` and the fields that make the model too big.
    """
    claimed, stored = config_parameters(config), _stored_values(weights)
    if claimed > stored:
        moe = f", moe.num_experts={config.moe.num_experts}" if config.moe else ""
        raise CheckpointError(
            f"{config_path}: describes a model of {claimed:,} parameters (vocab_size="
            f"{config.vocab_size}, hidden_size={config.hidden_size}, num_layers="
            f"{config.num_layers}, intermediate_size={config.mlp_hidden_size}{moe}), but "
            f"{weights} holds only {stored:,} values: the config does not belong to these "
            "weights. Nothing was allocated; re-save the model with model.save_pretrained(dir)."
        )
    head = config.hidden_size // config.num_heads
    if config.max_seq_len * head > MAX_ROPE_ENTRIES:
        raise CheckpointError(
            f"{config_path}: max_seq_len={config.max_seq_len} x head size {head} makes RoPE "
            f"tables of {config.max_seq_len * head:,} entries, over the limit of "
            f"{MAX_ROPE_ENTRIES:,} (4 GiB while built). Nothing was allocated."
        )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({exc}). Re-save the model with "
            "model.save_pretrained(dir), or restore the file from a backup."
        ) from None
    # A torch.compile'd module prefixes every key; the plain model has none.
    return {k.removeprefix(_COMPILE_PREFIX): v for k, v in state.items()}


def _warn_non_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """One warning naming the tensors that hold NaN or infinite values (they load as they are)."""
    bad = [
        name
        for name, t in state.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        log.warning(
            "%s: %d of %d tensors hold NaN or infinite values: %s%s. The model loaded as saved; "
            "its outputs will not be finite where these are used.",
            source,
            len(bad),
            len(state),
            ", ".join(bad[:10]),
            " ..." if len(bad) > 10 else "",
        )


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
    cls: type[_M],
    name_or_dir: str | Path,
    device: torch.device | str | None = None,
    *,
    store: ModelStore | str | Path | None = None,
) -> _M:
    """Build ``cls`` from ``config.json`` and load ``model.safetensors`` of a model folder.

    Args:
        name_or_dir: a folder; else the name of a model in ``store``
            (:meth:`ModelStore.resolve <apt.model.store.ModelStore.resolve>`).
        device: where to put the model (default: the CPU).
        store: the local model store, or its folder (default: ``$APT_HOME``, else
            ``~/.cache/apt/models``).

    Raises:
        ModelStoreError: a name the store does not hold (the message lists those it does).
        CheckpointError: the folder or a file is missing, not a regular file, corrupt or
            inconsistent; or the config describes a model the weights cannot fill (checked
            before anything is allocated: see the module docstring).
    """
    folder = ModelStore.of(store).resolve(name_or_dir)
    config = _read_config(folder / CONFIG_NAME)
    _check_sizes(config, folder / CONFIG_NAME, folder / WEIGHTS_NAME)
    state = _read_weights(folder / WEIGHTS_NAME)
    model = cls(config)
    load_weights(model, state, folder / WEIGHTS_NAME)
    _warn_non_finite(state, folder / WEIGHTS_NAME)
    model.tokenizer = load_tokenizer(folder)
    if device is not None:
        model.to(device)
    return model
