"""The run's tokenizer and ``model.vocab_size``: ``auto`` takes the tokenizer's size rounded up to
a multiple of 64 (matrix kernels prefer it); a number smaller than the tokenizer's is refused."""

from __future__ import annotations

import logging

from apt.core.config import APTConfig
from apt.core.config.data import vocab_mismatch
from apt.core.errors import ConfigError
from apt.model.tokenizers import Tokenizer

__all__ = ["VOCAB_MULTIPLE", "fit_vocab_size"]

log = logging.getLogger("apt")

#: ``vocab_size: auto`` rounds the tokenizer's size up to a multiple of this.
VOCAB_MULTIPLE = 64


def fit_vocab_size(cfg: APTConfig, tokenizer: Tokenizer) -> APTConfig:
    """``cfg`` with ``model.vocab_size`` set from ``tokenizer`` when it is ``auto``.

    Raises:
        ConfigError: a ``model.vocab_size`` smaller than the tokenizer's vocabulary (the
            message names both numbers and the fix).
    """
    vocab = cfg.model.vocab_size
    if vocab != "auto":
        problem = vocab_mismatch(vocab, tokenizer.name, tokenizer.vocab_size)
        if problem:
            raise ConfigError(problem)
        return cfg
    size = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    log.info(
        "model.vocab_size: auto -> %d (the %s tokenizer's %d ids, rounded up to a multiple of %d)",
        size,
        tokenizer.name,
        tokenizer.vocab_size,
        VOCAB_MULTIPLE,
    )
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": size})})
