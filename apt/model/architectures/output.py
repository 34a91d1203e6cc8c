"""What a forward pass returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

__all__ = ["ModelOutput"]


@dataclass
class ModelOutput:
    """Result of ``APTModel.forward``.

    Attributes:
        logits: (B, T, V) next-token logits (None when the forward was asked for the loss
            only: ``return_logits=False``).
        loss: ``lm_loss + sum(aux_losses.values())``; None without targets. Backpropagate this.
        lm_loss: float32 cross-entropy of the logits against the targets; None without targets.
        aux_losses: extra losses of the switched-on modules, already weighted, by name
            (``moe_balance``, ``moe_z``, ``align_kl``).
        stats: detached scalars worth logging (``moe_overflow_fraction``, ``voter_fired``).
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


# A pytree node, so DDP / FSDP output hooks and torch.compile see the tensors inside.
if hasattr(pytree, "register_dataclass"):
    pytree.register_dataclass(ModelOutput)
else:  # torch < 2.7
    torch.export.register_dataclass(ModelOutput)
