"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLU", "swiglu"]


def swiglu(x: torch.Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> torch.Tensor:
    """The SwiGLU function on (..., D) through the three projections; (..., D) out."""
    return down(F.silu(gate(x)) * up(x))  # (..., F) inside


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP.

    Args:
        dim: model width D.
        hidden: inner width F.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)
