"""Causal self-attention with grouped-query heads, RoPE and an optional KV cache.

Shapes: B batch, T new positions, S cached + new positions, D width, H query heads,
Hkv key/value heads, Dh head size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from apt.model.layers.documents import DocumentLayout
from apt.model.layers.rope import apply_rope

__all__ = ["CausalSelfAttention", "KVCache"]

#: Kernels for cached decoding. cuDNN attention (PyTorch's first choice for bf16 on Hopper)
#: builds an execution plan for every new key length, i.e. at every decoding step: ~5 ms each.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of one layer, kept across decoding steps.

    The buffers are allocated on the first write, in the dtype and on the device of the keys
    (so bf16 autocast caches bf16), with room for ``max_len`` positions.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, Hkv, T, Dh) keys/values at ``start``; return all so far, (B, Hkv, S, Dh)."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if self.k is None or self.v is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``num_kv_heads < num_heads`` shares each key/value head
    among ``num_heads // num_kv_heads`` query heads (grouped-query attention).

    Args:
        dim: model width D.
        num_heads: query heads H.
        num_kv_heads: key/value heads Hkv (divides H).
        dropout: attention-probability dropout while training.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, D)
        cos: torch.Tensor,  # (T, Dh/2), or (B, 1, T, Dh/2) for per-sequence positions
        sin: torch.Tensor,  # the same shape as cos
        cache: KVCache | None = None,
        start: int = 0,
        documents: DocumentLayout | None = None,  # packed rows: attend inside each document
    ) -> torch.Tensor:  # (B, T, D)
        B, T, _ = x.shape
        H, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, Hkv, S, Dh)
        if Hkv != H:
            k, v = self._repeat_kv(k), self._repeat_kv(v)  # (B, H, S, Dh)

        dropout_p = self.dropout if self.training else 0.0
        if documents is not None:
            y = documents.attend(q, k, v, dropout_p)  # (B, H, T, Dh)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        is_causal, mask = True, None
        if cache is not None and start > 0:
            # New queries sit at positions start..start+T-1 and see every key up to their own
            # position; SDPA's is_causal would align them with the first keys instead.
            is_causal = False
            if T > 1:
                q_pos = torch.arange(start, start + T, device=x.device)[:, None]  # (T, 1)
                mask = torch.arange(start + T, device=x.device)[None, :] <= q_pos  # (T, S)
        backends = sdpa_kernel(_DECODE_BACKENDS) if cache is not None else contextlib.nullcontext()
        with backends:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=dropout_p,
            )  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:  # (B, Hkv, S, Dh) -> (B, H, S, Dh)
        B, Hkv, S, Dh = t.shape
        rep = self.num_heads // Hkv
        return t[:, :, None].expand(B, Hkv, rep, S, Dh).reshape(B, Hkv * rep, S, Dh)
