"""A contiguous piece of an :class:`APTModel`, as one pipeline stage runs it.

The model never knows it is split: ``apt.trainops`` picks the pieces (which blocks, whether a
piece starts with the embedding or ends with the head) and builds :class:`APTStage` objects
from the model's own modules. A piece keeps the model's parameter names, the blocks under
their global index (``blocks.5.attn.q_proj.weight`` stays that in the piece that holds block
5), so a checkpoint of the pieces has the keys of a checkpoint of the whole model::

    first piece:   tokens (B, T)    -> embed_tokens -> blocks[a:b]                      -> (B, T, D)
    middle piece:  hidden (B, T, D) ->                 blocks[b:c]                      -> (B, T, D)
    last piece:    hidden (B, T, D) ->                 blocks[c:L] -> norm -> lm_head   -> (B, T, V)

Shapes as in :mod:`~apt.model.architectures.apt_model`. A last piece of a model whose head is
tied to the embedding also holds ``embed_tokens`` (never run there): the tied tensor keeps
its first name, ``embed_tokens.weight``, on both pieces that use it.
"""

from __future__ import annotations

import torch
from torch import nn

from apt.model.architectures.apt_model import APTModel

__all__ = ["PIPELINE_LAYERS", "APTStage", "head_is_tied"]

#: The attribute of :class:`APTModel` that holds the blocks a pipeline spreads over stages.
PIPELINE_LAYERS = "blocks"


def head_is_tied(model: APTModel) -> bool:
    """Whether the output head shares the embedding's tensor (``model.tie_embeddings``)."""
    return model.lm_head.weight is model.embed_tokens.weight


class APTStage(nn.Module):
    """Blocks ``layers`` of ``model`` (its own modules, not copies), after the embedding when
    ``first`` and before the final norm and head when ``last``.

    Args:
        model: the whole model.
        layers: the indices of the blocks this piece runs, contiguous.
        first: the piece starts with the token embedding (takes token ids).
        last: the piece ends with the final norm and the head (returns logits).
    """

    def __init__(self, model: APTModel, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.max_seq_len = model.config.max_seq_len
        # Registered in the model's order, so a tied head keeps the embedding's name.
        self.embed_tokens = model.embed_tokens if first or (last and head_is_tied(model)) else None
        self.rope = model.rope  # buffers only (not saved): every piece computes its angles
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids (first piece) or (B, T, D) hidden states -> (B, T, D) hidden
        states, or (B, T, V) logits (last piece)."""
        if self.first:
            assert self.embed_tokens is not None
            if x.shape[1] > self.max_seq_len:
                raise ValueError(
                    f"sequence of {x.shape[1]} positions exceeds model.max_seq_len "
                    f"({self.max_seq_len}); shorten it or raise max_seq_len"
                )
            x = self.embed_tokens(x)  # (B, T, D)
        cos, sin = self.rope(0, x.shape[1])  # (T, Dh/2) each
        for block in self.blocks.values():
            x, _ = block(x, cos, sin)
        if not self.last:
            return x  # (B, T, D)
        assert self.norm is not None and self.lm_head is not None
        return self.lm_head(self.norm(x))  # (B, T, V)
