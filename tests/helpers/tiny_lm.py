"""A tiny real language model and a patterned text dataset, shared by the Trainer tests.

Plain modules of ``tests/helpers`` (``tests/conftest.py`` puts the folder on ``sys.path``):
``from tiny_lm import BigramLM, PatternText``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["BigramLM", "PatternText"]


class BigramLM(nn.Module):
    """Embedding -> (tanh) -> linear: a bigram model that returns logits ``(B, T, V)``, like
    most user models.

    Args:
        vocab: token ids ``0..vocab-1``.
        width: embedding width.
        squash: a tanh between the two layers.
    """

    def __init__(self, vocab: int = 32, width: int = 16, *, squash: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, vocab)
        self.squash = squash

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.emb(input_ids)
        return self.proj(torch.tanh(hidden) if self.squash else hidden)


class PatternText(Dataset[dict[str, torch.Tensor]]):
    """Sequences ``start, start+3, start+6, ...`` (mod ``vocab``): learnable, so the loss falls.

    Args:
        n: sequences.
        seq: tokens per sequence.
        vocab: token ids ``0..vocab-1``.
        seed: draws the starts (and the lengths).
        padded: each row also has an ``attention_mask`` of a random length in ``4..seq``.
    """

    def __init__(
        self, n: int = 64, seq: int = 12, vocab: int = 32, seed: int = 0, *, padded: bool = True
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n,), generator=gen)
        steps = torch.arange(seq)
        self.ids = (starts[:, None] + 3 * steps[None, :]) % vocab
        self.mask: torch.Tensor | None = None
        if padded:
            lengths = torch.randint(4, seq + 1, (n,), generator=gen)
            self.mask = (steps[None, :] < lengths[:, None]).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.mask is None:
            return {"input_ids": self.ids[i]}
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
