"""``TrainingBundle``: what a run trains, as one object that checkpoints save and load whole."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["TrainingBundle"]

_FIXED = ("model", "optimizer", "lr_scheduler", "scaler")


@dataclass(eq=False)
class TrainingBundle(Mapping[str, Any]):
    """The stateful parts of a run, by name.

    The four every run has are attributes; anything more a recipe trains or needs restored (a
    LoRA adapter kept apart, a frozen reference model, a value head, a second optimizer) is one
    more entry of ``extras``. As a mapping (``bundle["model"]``, ``dict(bundle)``) it is what
    :class:`~apt.trainops.checkpoints.CheckpointManager` saves and loads; entries that are None
    are left out.

    Attributes:
        model: the model being trained, as wrapped by the strategy (DDP, FSDP, compile).
        optimizer: its optimizer.
        lr_scheduler: the learning-rate scheduler (``step()`` once per optimizer step).
        scaler: the GradScaler (enabled for fp16 only).
        extras: further named parts.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        taken = sorted(set(self.extras) & set(_FIXED))
        if taken:
            raise ValueError(f"extras may not be named {taken}: those are the bundle's own parts")

    def add(self, name: str, part: Any) -> None:
        """Add one more named part (a reference model, a value head, ...).

        Raises:
            ValueError: ``name`` is taken.
        """
        if name in _FIXED or name in self.extras:
            raise ValueError(f"the bundle already has a part named {name!r}")
        self.extras[name] = part

    def _parts(self) -> dict[str, Any]:
        fixed = {name: getattr(self, name) for name in _FIXED}
        return {k: v for k, v in {**fixed, **self.extras}.items() if v is not None}

    def __getitem__(self, name: str) -> Any:
        parts = self._parts()
        if name not in parts:
            raise KeyError(f"the bundle has no part {name!r} (it has: {', '.join(parts)})")
        return parts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts())

    def __len__(self) -> int:
        return len(self._parts())
