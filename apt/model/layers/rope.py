"""Rotary position embedding (RoPE), "rotate half" convention, with optional Llama 3
frequency scaling.

Shapes: T positions, Dh head size, Dh/2 rotation frequencies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from apt.core.config.model import RopeScalingConfig

__all__ = ["RotaryEmbedding", "apply_rope", "inverse_frequencies"]


def inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScalingConfig | None = None,
    *,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The Dh/2 rotation frequencies (radians per position), in float64.

    Args:
        head_dim: size of one attention head (even).
        theta: base frequency.
        scaling: frequency scaling (``kind: llama3``); None: plain RoPE.
        device: where the tensor is made.

    Returns:
        A (Dh/2,) float64 tensor, highest frequency first.
    """
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
    inv_freq = theta ** (-exponent / head_dim)  # (Dh/2,)
    if scaling is None:
        return inv_freq
    # Llama 3: keep the short wavelengths (they resolve nearby tokens), stretch the long ones by
    # `factor` so that the longer context stays inside the angles seen in training, and blend
    # linearly (in context / wavelength) across the band between.
    context = scaling.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq  # (Dh/2,)
    ratio = context / wavelen  # wavelengths per original context
    blend = (ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blend = blend.clamp(0.0, 1.0)  # 0: long wavelengths, divided in full; 1: short ones, kept
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to ``max_seq_len``.

    The tables are non-persistent float32 buffers: they are never saved, and they are rebuilt
    (not cast) whenever the module moves or changes dtype, so ``model.bfloat16()`` or
    ``to_empty()`` after a meta-device build leave them exact.

    Args:
        head_dim: size of one attention head (even).
        max_seq_len: number of positions in the tables.
        theta: base frequency.
        scaling: frequency scaling (``model.rope_scaling``); None: plain RoPE.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        theta: float,
        scaling: RopeScalingConfig | None = None,
    ) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.scaling = scaling
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = inverse_frequencies(self.head_dim, self.theta, self.scaling, device=device)
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float64)
        angles = torch.outer(positions, inv_freq)  # (T, Dh/2)
        return angles.cos().float(), angles.sin().float()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        if not self.cos.is_meta:
            self.cos, self.sin = self._tables(self.cos.device)
        return self

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) rows of positions ``start .. start + length - 1``, each (T, Dh/2)."""
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, heads, T, Dh) by the per-position angles ``cos``/``sin`` (T, Dh/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, h, T, Dh/2) each
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)
