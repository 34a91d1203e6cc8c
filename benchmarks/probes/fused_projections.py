"""Probe: q/k/v and gate/up stored as one parameter each, against APT's separate ones.

APT does not ship this layout (docs/performance.md says why: measured slower on one H200). The
probe swaps the attention and MLP classes of the model builder for fused ones and runs
``gpu_throughput.py``; ``MODES`` (the first argument) names the layout of each APT run in order,
so every run needs a ``--lever`` (any harmless override) after the default one:

    python benchmarks/probes/fused_projections.py sep,fused,sep,fused --profile-steps 3 \
        --lever model.dropout=0.0 --lever model.dropout=0.0 --lever model.dropout=0.0

It trains only the plain causal path (no KV cache, no packed documents, no MoE layers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_throughput

from apt.model.architectures import apt_model
from apt.model.layers.rope import apply_rope

_SEPARATE = (apt_model.CausalSelfAttention, apt_model.SwiGLU)


class FusedAttention(nn.Module):
    """Causal attention with one (H + 2 Hkv) Dh x D projection for q, k and v."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.qkv_proj = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *_: Any) -> Any:
        B, T, _ = x.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
        q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, Hkv, Dh).transpose(1, 2)
        v = v.view(B, T, Hkv, Dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FusedSwiGLU(nn.Module):
    """SwiGLU with one 2F x D projection for gate and up."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def main() -> None:
    modes = sys.argv.pop(1).split(",")
    if not set(modes) <= {"sep", "fused"}:
        raise SystemExit(f"modes are sep or fused, comma-separated; got {modes}")
    measure = gpu_throughput.apt_run
    runs = iter(modes)

    def apt_run(args: argparse.Namespace, batches: list, lever: list[str]) -> dict[str, Any]:
        mode = next(runs)
        fused = (FusedAttention, FusedSwiGLU)
        apt_model.CausalSelfAttention, apt_model.SwiGLU = fused if mode == "fused" else _SEPARATE  # type: ignore[assignment,misc]
        row = measure(args, batches, lever)
        row["run"] = f"APT projections={mode}"
        return row

    gpu_throughput.apt_run = apt_run
    gpu_throughput.main()


if __name__ == "__main__":
    main()
