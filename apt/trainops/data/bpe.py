"""Train a byte-level BPE tokenizer on the user's text (``python -m apt data tokenizer``).

Byte-level: every byte is in the starting alphabet, so any text encodes without an unknown
token, and the merges are learnt from the corpus by the ``tokenizers`` library. The special
tokens (:data:`apt.model.tokenizers.SPECIAL_TOKENS`: end of text, padding, chat markers) take
ids 0-5. The result is one ``tokenizer.json``, read back by ``data.tokenizer: {kind: bpe,
path: DIR}`` and by ``transformers``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from apt.core.errors import ConfigError
from apt.model.tokenizers import SPECIAL_TOKENS, TOKENIZER_FILE, JSONTokenizer
from apt.trainops.data.corpus import read_documents, resolve_files

__all__ = ["MIN_VOCAB_SIZE", "train_bpe"]

log = logging.getLogger("apt")

#: The 256 bytes and the special tokens, before any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe(
    inputs: Sequence[str],
    *,
    vocab_size: int,
    output: Path,
    text_field: str = "text",
    min_frequency: int = 2,
    progress: bool = False,
) -> Path:
    """Learn a byte-level BPE of ``vocab_size`` ids from the text of ``inputs`` (paths or
    globs of .txt / .jsonl files) and write ``output/tokenizer.json``; return its path.

    Deterministic: the same files give the same merges and the same file.

    Raises:
        ConfigError: ``vocab_size`` below :data:`MIN_VOCAB_SIZE`, or the tokenizers library is
            missing.
        DataError: an input that matches nothing or cannot be read (named, with the fix).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE holds the 256 bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens before any merge. Use at least "
            f"{MIN_VOCAB_SIZE} (GPT-2 uses 50257; 8192-32768 suits a corpus of a few GB)."
        )
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ConfigError(
            "training a BPE tokenizer needs the tokenizers library: "
            "pip install 'apt-transformer[hf]'"
        ) from None
    files = resolve_files(inputs, key="--input")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )

    def texts() -> Iterator[str]:
        for _file, text in read_documents(files, text_field=text_field):
            yield text

    tokenizer.train_from_iterator(texts(), trainer)
    output.mkdir(parents=True, exist_ok=True)
    path = output / TOKENIZER_FILE
    tokenizer.save(str(path))
    trained = JSONTokenizer(path, kind="bpe")
    if trained.vocab_size < vocab_size:
        log.warning(
            "the BPE has %d ids, fewer than --vocab-size %d: the text of %d file(s) has no "
            "more pairs seen %d times or more. Train on more text for a larger vocabulary.",
            trained.vocab_size,
            vocab_size,
            len(files),
            min_frequency,
        )
    log.info(
        "BPE tokenizer of %d ids (end of text: id %d) trained on %d file(s) -> %s",
        trained.vocab_size,
        trained.eos_id,
        len(files),
        path,
    )
    return path
