"""Attention kept inside the documents of a packed sequence.

A packed row holds several documents back to back; ``document_ids`` (B, T) number them
(non-decreasing along T). Each token attends causally to the tokens of its own document only,
and its position restarts at its document's first token, so a packed row computes what its
documents would alone. Three kernels compute that same attention (``model.document_attention``):

* ``mask``: SDPA with a dense (B, 1, T, T) block-causal mask. Any device, any strategy, no
  host sync, one graph under torch.compile; costs T^2 per row whatever the documents.
* ``varlen``: SDPA with ``is_causal`` on each document alone. Costs sum(L^2) for documents of
  lengths L, never the T^2 of the whole row, and builds no mask; reads the document bounds on
  the host (one sync per forward) and runs one SDPA call per document.
* ``flex``: FlexAttention with a block-sparse mask (blocks of 128 x 128 that cross no document
  boundary are skipped), compiled. CUDA only for training (PyTorch's FlexAttention has no CPU
  backward) and without attention dropout.

``auto`` takes ``flex`` on CUDA (``varlen`` when attention dropout is on) and ``varlen``
elsewhere.

Shapes: B batch, H heads, T positions, Dh head size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
import torch.nn.functional as F

from apt.core.errors import ConfigError

__all__ = ["DocumentAttention", "DocumentLayout", "document_layout", "resolve_kernel"]

DocumentAttention = Literal["auto", "mask", "varlen", "flex"]
_Kernel = Literal["mask", "varlen", "flex"]


@dataclass(frozen=True)
class DocumentLayout:
    """What every attention layer of one forward needs about the documents of its rows.

    Attributes:
        positions: (B, T) each token's position inside its document.
        kernel: the kernel that attends (``mask``, ``varlen`` or ``flex``).
        mask: ``mask``: (B, 1, T, T) bool, True where a query may attend.
        bounds: ``varlen``: per row, the ``(start, stop)`` of each document.
        block_mask: ``flex``: the FlexAttention ``BlockMask``.
    """

    positions: torch.Tensor
    kernel: _Kernel
    mask: torch.Tensor | None = None
    bounds: tuple[tuple[tuple[int, int], ...], ...] = ()
    block_mask: Any = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
    ) -> torch.Tensor:
        """(B, H, T, Dh) queries, keys and values -> (B, H, T, Dh), each document alone."""
        if self.kernel == "mask":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=dropout_p)
        if self.kernel == "varlen":
            rows = [
                torch.cat(
                    [
                        F.scaled_dot_product_attention(
                            q[b : b + 1, :, start:stop],
                            k[b : b + 1, :, start:stop],
                            v[b : b + 1, :, start:stop],
                            is_causal=True,
                            dropout_p=dropout_p,
                        )
                        for start, stop in row
                    ],
                    dim=2,
                )
                for b, row in enumerate(self.bounds)
            ]
            return torch.cat(rows, dim=0)
        if dropout_p:
            raise ConfigError(
                "model.document_attention: flex has no attention dropout, but model.dropout is "
                f"{dropout_p}; set model.document_attention: varlen (or auto), or dropout: 0"
            )
        if q.requires_grad and q.device.type == "cpu":
            raise ConfigError(
                "model.document_attention: flex cannot train on the CPU (PyTorch's "
                "FlexAttention has no CPU backward); set model.document_attention: varlen "
                "(or auto, which takes varlen there)"
            )
        return _flex()(q, k, v, block_mask=self.block_mask)


def resolve_kernel(choice: DocumentAttention, device: torch.device, dropout: float) -> _Kernel:
    """The kernel ``choice`` means on ``device`` (``auto``: flex on CUDA without attention
    dropout, varlen otherwise)."""
    if choice != "auto":
        return choice
    return "flex" if device.type == "cuda" and dropout == 0 else "varlen"


def document_layout(document_ids: torch.Tensor, kernel: _Kernel) -> DocumentLayout:
    """(B, T) document ids -> the positions and what ``kernel`` needs to attend."""
    B, T = document_ids.shape
    device = document_ids.device
    index = torch.arange(T, device=device).expand(B, T)
    first = torch.ones_like(document_ids, dtype=torch.bool)
    first[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.where(first, index, torch.zeros_like(index)).cummax(dim=1).values
    positions = index - starts
    if kernel == "mask":
        same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return DocumentLayout(positions, kernel, mask=(same & causal)[:, None])
    if kernel == "varlen":
        begins: list[list[int]] = [[] for _ in range(B)]
        for b, t in first.nonzero().tolist():  # row-major: each row's starts in order
            begins[b].append(t)
        bounds = tuple(tuple(zip(row, [*row[1:], T], strict=True)) for row in begins)
        return DocumentLayout(positions, kernel, bounds=bounds)
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (document_ids[b, q] == document_ids[b, kv]) & (q >= kv)

    block_mask = create_block_mask(same_document_causal, B, None, T, T, device=device)
    return DocumentLayout(positions, kernel, block_mask=block_mask)


def _flex() -> Callable[..., Any]:
    """FlexAttention as it should run here: inside a compiled model the model's own graph
    compiles it; outside one it is compiled on its own (once), since uncompiled it
    materialises the whole (T, T) score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex()


@cache
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
