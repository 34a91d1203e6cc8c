"""A tiny APTModel, its data and a training step, shared by every distributed test.

Shapes: B batch, T tokens, D width, V vocabulary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import nn

from apt.core.config.model import ModelConfig
from apt.model import build_model

VOCAB, DIM, HEADS, SEQ, BLOCKS = 64, 32, 2, 16, 2
GLOBAL_BATCH = 8  # sequences per optimizer step, summed over ranks
LR = 1e-2
MAX_NORM = 1.0


TINY = ModelConfig(
    vocab_size=VOCAB, hidden_size=DIM, num_layers=BLOCKS, num_heads=HEADS, max_seq_len=SEQ
)


def held_barrier(barrier: Callable[[], None], release: threading.Event) -> Callable[[], None]:
    """``barrier`` that, called off the main thread (an async checkpoint's writer), first waits
    for ``release``: the test decides when the writer may write."""

    def wait() -> None:
        if threading.current_thread() is not threading.main_thread():
            release.wait(60)
        barrier()

    return wait


def make_model(seed: int = 0, cfg: ModelConfig = TINY) -> nn.Module:
    """A tiny APTModel (``blocks`` ModuleList, tied embedding/head, RoPE buffers)."""
    torch.manual_seed(seed)
    return build_model(cfg)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def global_batch(step: int, size: int = GLOBAL_BATCH) -> torch.Tensor:
    """The step's global batch, the same on every rank: (size, SEQ + 1) token ids.

    Arithmetic sequences (random start and stride), so there is something to learn.
    """
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=gen)
    stride = torch.randint(1, 4, (size, 1), generator=gen)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (equal slices, so means agree)."""
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    tokens = tokens.to(next(model.parameters()).device)  # (B, T + 1)
    return model(tokens[:, :-1], tokens[:, 1:]).loss


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: range,
    *,
    rank: int = 0,
    world: int = 1,
    clip=None,
    mean=None,
) -> Iterator[float]:
    """Optimizer steps on the global batches of ``steps``; yields each step's global loss.

    Args:
        clip: ``(model, max_norm) -> norm`` (a strategy's clip_grad_norm_); default torch's.
        mean: averages the local loss over ranks (``all_reduce_mean``); default identity.
    """
    clip = clip or (lambda m, n: float(torch.nn.utils.clip_grad_norm_(m.parameters(), n)))
    mean = mean or (lambda x: x)
    for step in steps:
        tokens = shard(global_batch(step), rank, world)
        loss = lm_loss(model, tokens)
        loss.backward()
        clip(model, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield float(mean(loss.detach()))


def accumulate(model: nn.Module, micro: int, *, rank: int, world: int, no_sync=None) -> None:
    """Backward over ``micro`` micro-batches of step 0's batch, syncing only on the last when
    ``no_sync`` (a strategy's) is given; the loss is divided by ``micro`` as a loop would."""
    batch = shard(global_batch(0, GLOBAL_BATCH * micro), rank, world)
    chunks = batch.chunk(micro)
    for i, tokens in enumerate(chunks):
        ctx = no_sync(model) if no_sync is not None and i < micro - 1 else nullcontext()
        with ctx:
            (lm_loss(model, tokens) / micro).backward()
