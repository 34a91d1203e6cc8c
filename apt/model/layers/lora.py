"""LoRA: low-rank adapters on linear layers, merged into the weights or saved on their own.

    y = x W^T + b + s * dropout(x) A^T B^T          s = alpha / r  (rslora: alpha / sqrt(r))

Shape legend:  I in_features   O out_features   r rank

:class:`LoRALinear` *is* an ``nn.Linear`` (a subclass), so the base weight keeps its name:
``blocks.0.attn.q_proj.weight`` stays ``blocks.0.attn.q_proj.weight`` and gains
``...q_proj.lora_A`` (r, I) and ``...q_proj.lora_B`` (O, r) beside it. A checkpoint of a LoRA
run is the plain model's state plus the adapters; :func:`merged_state_dict` folds them into the
weights (``W + s * B @ A``, PEFT's formula) and leaves exactly the plain model's keys, so a
merged export loads like any other. :func:`save_adapter` / :func:`load_adapter` write and read
the adapters alone (``adapter_model.safetensors`` + ``adapter_config.json``).

``B`` starts at zero, so a freshly adapted model computes what its base does. The adapters are
ordinary parameters of the layer: ``torch.compile`` traces them like any other, and FSDP's
``fully_shard`` per block shards them with the block's other parameters (frozen and trained
ones may share a block under FSDP2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from apt.core.errors import CheckpointError, ConfigError
from apt.core.files import apply_umask

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT",
    "ADAPTER_WEIGHTS",
    "LoRALinear",
    "adapter_state_dict",
    "apply_lora",
    "load_adapter",
    "lora_modules",
    "merge_lora",
    "merged_state_dict",
    "save_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "apt-lora"
_FORMAT_VERSION = 1
_LORA_KEYS = ("lora_A", "lora_B")
#: An adapter_config.json larger than this is refused (one is a few KB).
_CONFIG_MAX_BYTES = 1 << 20


def _like(weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An uninitialised (rows, cols) tensor on ``weight``'s device, in its dtype."""
    return torch.empty(rows, cols, device=weight.device, dtype=weight.dtype)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a trainable low-rank update ``s * B @ A`` added to its output.

    Args:
        in_features / out_features / bias / device / dtype: as ``nn.Linear``.
        rank: r, the inner size of the update.
        alpha: the update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with rslora).
        dropout: dropout on the adapter's input only.
        rslora: rank-stabilised scaling.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
    ) -> None:
        if rank < 1:
            raise ConfigError(f"finetune.lora.rank: {rank} must be at least 1")
        super().__init__(in_features, out_features, bias, device, dtype)
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora_A = nn.Parameter(_like(self.weight, rank, in_features))  # (r, I)
        self.lora_B = nn.Parameter(_like(self.weight, out_features, rank))  # (O, r)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, rank: int, alpha: float, dropout: float, rslora: bool
    ) -> LoRALinear:
        """A LoRA layer over ``linear``'s own weight and bias tensors (shared, not copied)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",  # the base tensors are ``linear``'s: allocate nothing for them
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            rslora=rslora,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.lora_A = nn.Parameter(_like(linear.weight, rank, linear.in_features))
        layer.lora_B = nn.Parameter(_like(linear.weight, linear.out_features, rank))
        layer.reset_lora_parameters()
        layer.train(linear.training)
        return layer

    def reset_parameters(self) -> None:
        """The base weight as ``nn.Linear`` draws it, and the adapters reset (B = 0)."""
        super().reset_parameters()
        if hasattr(self, "lora_A"):  # nn.Linear.__init__ calls this before they exist
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A drawn like an ``nn.Linear`` weight, B zero: the update starts at zero."""
        if self.lora_A.is_meta:
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` (O, I), computed in fp32, in the weight's dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        base = F.linear(x, self.weight, self.bias)  # (..., O)
        low = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        return base + F.linear(low, self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (tied weights)."""
    count: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                count[id(param)] = count.get(id(param), 0) + 1
    return {key for key, n in count.items() if n > 1}


def _chosen(name: str, targets: set[str]) -> bool:
    return name in targets or name.rsplit(".", 1)[-1] in targets


def apply_lora(
    model: nn.Module,
    *,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Replace the ``nn.Linear`` modules named by ``targets`` with :class:`LoRALinear` layers
    over the same weight tensors, in place (before the model is wrapped, sharded or compiled).

    Args:
        model: the plain model.
        targets: module names: a full name (``blocks.0.attn.q_proj``) or a last component
            (``q_proj``, every module so named). Richer patterns: :mod:`apt.trainops.engine.freeze`.
        rank / alpha / dropout / rslora: as :class:`LoRALinear`.

    Returns:
        The names of the adapted modules, in module order.

    Raises:
        ConfigError: a target names no linear module, one already has adapters, or one's
            weight is tied to another module (merging would change both).
    """
    wanted = set(targets)
    shared = _shared_weights(model)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name and _chosen(name, wanted) and isinstance(module, nn.Linear)
    ]
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = sorted(t for t in wanted if not any(_chosen(n, {t}) for n, _ in chosen))
    if missing:
        raise ConfigError(
            f"finetune.lora.targets: {missing} name no linear layer of this model; its linear "
            f"layers are e.g. {_examples(linear_names)}. To fix: name one of those (a last "
            "component such as q_proj names every layer so called)."
        )
    for name, module in chosen:
        if isinstance(module, LoRALinear):
            raise ConfigError(f"finetune.lora: {name} has LoRA adapters already")
        if id(module.weight) in shared:
            raise ConfigError(
                f"finetune.lora.targets: {name}.weight is tied to another module's weight "
                "(model.tie_embeddings); an adapter merged into it would change both. To fix: "
                f"drop {name.rsplit('.', 1)[-1]} from the targets, or untie the weights."
            )
    for name, module in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear.from_linear(
            module, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora
        )
        setattr(parent, leaf, layer)
    return [name for name, _ in chosen]


def _examples(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def adapter_state_dict(
    model: nn.Module, *, trainable: Iterable[str] = (), state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The adapters (``<module>.lora_A`` / ``.lora_B``) and the base parameters named in
    ``trainable``, from ``state`` (default: the model's own)."""
    state = model.state_dict() if state is None else state
    names = [f"{m}.{key}" for m in lora_modules(model) for key in _LORA_KEYS]
    return {name: state[name] for name in [*names, *trainable]}


def merged_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``state`` (default: the model's own) with every adapter merged into its weight,
    ``W + s * B @ A``, and no ``lora_*`` keys: the plain model's layout. New tensors for the
    merged weights; the model and ``state`` are not changed."""
    state = dict(model.state_dict() if state is None else state)
    for name, module in lora_modules(model).items():
        a, b = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B")
        weight = state[f"{name}.weight"]
        delta = (b.float() @ a.float()) * module.scaling  # (O, I)
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its weight and put a plain ``nn.Linear`` back in its place,
    in place (for inference). Returns the names of the merged modules."""
    merged = lora_modules(model)
    for name, module in merged.items():
        plain = nn.Linear(
            module.in_features, module.out_features, module.bias is not None, device="meta"
        )
        plain.weight = nn.Parameter(
            module.weight + module.delta_weight(), requires_grad=module.weight.requires_grad
        )
        plain.bias = module.bias
        plain.train(module.training)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
    return list(merged)


def _base_description(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    lora_ids = {id(p) for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)}
    base = sum(p.numel() for p in model.parameters() if id(p) not in lora_ids)
    return {
        "class": type(model).__name__,
        "parameters": base,
        "config": config.model_dump(mode="json") if isinstance(config, BaseModel) else None,
    }


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    trainable: Iterable[str] = (),
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (rank, alpha, the
    adapted modules, the base model's class, size and config) into ``directory``, each file
    atomically.

    Args:
        model: a model with LoRA layers (:func:`apply_lora`).
        directory: the folder (created).
        trainable: base parameters trained beside the adapters, saved with them.
        state: the model's full state to take the tensors from (gathered from shards).

    Raises:
        ConfigError: the model has no LoRA layers.
        OSError: a file could not be written.
    """
    modules = lora_modules(model)
    if not modules:
        raise ConfigError("save_adapter: the model has no LoRA layers (apply_lora adds them)")
    first = next(iter(modules.values()))
    trained = list(trainable)
    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in adapter_state_dict(model, trainable=trained, state=state).items()
    }
    description = {
        "format": ADAPTER_FORMAT,
        "format_version": _FORMAT_VERSION,
        "rank": first.rank,
        "alpha": first.alpha,
        "rslora": first.rslora,
        "dropout": getattr(first.lora_dropout, "p", 0.0),
        "modules": list(modules),
        "trainable": trained,
        "base_model": _base_description(model),
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(description, indent=2, sort_keys=True) + "\n"
    _write_atomic(out / ADAPTER_CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
    _write_atomic(
        out / ADAPTER_WEIGHTS,
        lambda p: save_file(tensors, str(p), metadata={"format": "pt", "apt": ADAPTER_FORMAT}),
    )
    return out


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_description(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, "
            "written by save_adapter or an export with finetune.lora.merge: false)"
        )
    if path.stat().st_size > _CONFIG_MAX_BYTES:
        raise CheckpointError(f"{path}: over {_CONFIG_MAX_BYTES} bytes; not an adapter config")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(description, dict) or description.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: not an APT adapter config (format {ADAPTER_FORMAT!r})")
    if description.get("format_version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: adapter format version {description.get('format_version')!r}; this "
            f"APT reads version {_FORMAT_VERSION}. Load it with the APT version that wrote it."
        )
    kinds: dict[str, type | tuple[type, ...]] = {
        "rank": int,
        "alpha": (int, float),
        "rslora": bool,
        "dropout": (int, float),
    }
    wrong = [key for key, kind in kinds.items() if not isinstance(description.get(key), kind)]
    for key in ("modules", "trainable"):
        value = description.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            wrong.append(key)
    if wrong or description["rank"] < 1 or not description["modules"]:
        raise CheckpointError(
            f"{path}: missing or invalid {', '.join(wrong) or 'rank/modules'}; the file is "
            "damaged or was not written by save_adapter"
        )
    return description


def load_adapter(model: nn.Module, directory: str | Path, *, merge: bool = False) -> list[str]:
    """Put the adapters saved in ``directory`` onto ``model`` (its base, as when saved).

    Modules without adapters get them (:func:`apply_lora` with the saved rank and alpha);
    modules that have them already are overwritten. Trainable base parameters saved with the
    adapter are loaded too.

    Args:
        model: the base model.
        directory: a folder written by :func:`save_adapter`.
        merge: fold the adapters into the weights afterwards (:func:`merge_lora`).

    Returns:
        The names of the adapted modules.

    Raises:
        CheckpointError: the folder is not an adapter folder, or its tensors do not fit
            ``model`` (missing modules, other shapes).
    """
    folder = Path(directory)
    description = _read_description(folder)
    names: list[str] = description["modules"]
    present = dict(model.named_modules())
    absent = [n for n in names if not isinstance(present.get(n), nn.Linear)]
    if absent:
        raise CheckpointError(
            f"{folder}: the adapter is for linear layers this model lacks: "
            f"{_examples(absent)}; load it onto the base model it was trained on"
        )
    todo = [n for n in names if not isinstance(present[n], LoRALinear)]
    if todo:
        apply_lora(
            model,
            targets=todo,
            rank=int(description["rank"]),
            alpha=float(description["alpha"]),
            dropout=float(description["dropout"]),
            rslora=description["rslora"],
        )
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: unreadable ({exc})") from None
    _copy_into(model, tensors, folder=folder, names=names, trainable=description["trainable"])
    if merge:
        merge_lora(model)
    return names


@torch.no_grad()
def _copy_into(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    folder: Path,
    names: list[str],
    trainable: list[str],
) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = {f"{n}.{key}" for n in names for key in _LORA_KEYS} | set(trainable)
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise CheckpointError(
            f"{folder / ADAPTER_WEIGHTS}: its tensors do not match {ADAPTER_CONFIG} "
            f"(differ: {_examples(odd)}); the folder is damaged or mixed from two saves"
        )
    for key in sorted(expected):
        target = params.get(key)
        if target is None or target.shape != tensors[key].shape:
            shape = None if target is None else tuple(target.shape)
            raise CheckpointError(
                f"{folder}: {key} has shape {tuple(tensors[key].shape)} in the adapter and "
                f"{shape} in the model; load it onto the base model it was trained on"
            )
        target.copy_(tensors[key])
