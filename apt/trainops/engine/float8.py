"""``training.float8``: the linear layers' matrix products in FP8 through torchao's float8
training (dynamic scaling, tensorwise or rowwise), the master weights and everything else as
before.

Converted are the ``nn.Linear`` layers whose both sizes are multiples of 16 (what the FP8 matrix
kernels take), except the output head and any layer whose weight is tied to another module's:
the head's FP8 rounding costs loss for little speed, and a tied weight is also an embedding.
The parameters keep their names and dtypes, so checkpoints, exports and resumes are the same
with FP8 on or off. FP8 matrix products need an NVIDIA GPU of compute capability 8.9 or newer
(Ada, Hopper, Blackwell) and torchao; without either the run says so once and trains without
FP8.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

import torch
from torch import nn

__all__ = ["Float8Recipe", "apply_float8", "float8_candidates", "float8_unavailable"]

log = logging.getLogger("apt")

Float8Recipe = Literal["off", "tensorwise", "rowwise"]

#: Names of output heads, which stay in high precision.
_HEADS = frozenset({"lm_head", "output", "head"})

#: The smallest CUDA compute capability with FP8 matrix units.
_FP8_CAPABILITY = (8, 9)


def float8_unavailable(device: torch.device) -> str | None:
    """Why FP8 training cannot run on ``device`` here, or None when it can."""
    if device.type != "cuda":
        return f"FP8 matrix products need an NVIDIA GPU; this run trains on {device.type}"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'apt-transformer[float8]')"
    capability = torch.cuda.get_device_capability(device)
    if capability < _FP8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"{name} has compute capability {capability[0]}.{capability[1]}; FP8 matrix "
            "products need 8.9 or newer (Ada, Hopper, Blackwell)"
        )
    return None


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of the parameters held by more than one module."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def float8_candidates(model: nn.Module) -> list[str]:
    """Names of the linear layers FP8 training converts, in module order."""
    tied = _tied_weights(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
        and name.rsplit(".", 1)[-1] not in _HEADS
        and id(module.weight) not in tied
    ]


def apply_float8(model: nn.Module, recipe: Float8Recipe, device: torch.device) -> list[str]:
    """Convert ``model``'s eligible linear layers to FP8 training in place (before it is
    wrapped, sharded or compiled); return the names converted (none when ``recipe`` is off or
    FP8 cannot run here: then a warning says why, once)."""
    if recipe == "off":
        return []
    reason = float8_unavailable(device)
    if reason is not None:
        log.warning("training.float8: %s: %s; training without FP8.", recipe, reason)
        return []
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    names = float8_candidates(model)
    chosen = set(names)
    convert_to_float8_training(
        model,
        config=Float8LinearConfig.from_recipe_name(recipe),
        module_filter_fn=lambda _module, fqn: fqn in chosen,
    )
    kept = sum(isinstance(m, nn.Linear) for m in model.modules()) - len(names)
    log.info(
        "training.float8: %d linear layers train in FP8 (%s scaling); %d stay in high "
        "precision (the head, tied weights, sizes not multiples of 16)",
        len(names),
        recipe,
        kept,
    )
    return names
