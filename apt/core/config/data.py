"""``data:`` — where the text comes from and how it becomes token sequences."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from apt.core.config.base import Section
from apt.core.config.plugins import TokenizerSpec
from apt.core.config.resume import FREE

__all__ = ["TOKENIZER_VOCAB", "DataConfig", "vocab_mismatch"]

#: Vocabulary size of the tokenizers whose size is known without building them.
TOKENIZER_VOCAB: dict[str, int] = {"byte": 256}


def vocab_mismatch(vocab_size: int, tokenizer: str, tokenizer_vocab: int) -> str | None:
    """Why ``model.vocab_size`` cannot hold the ids of the tokenizer, or None when it can.

    The load-time check covers :data:`TOKENIZER_VOCAB`; code that builds another tokenizer
    calls this with the built tokenizer's size and raises ``ConfigError`` with the message.
    """
    if vocab_size >= tokenizer_vocab:
        return None
    return (
        f"model.vocab_size: {vocab_size} is smaller than the vocabulary of data.tokenizer "
        f"{tokenizer!r} ({tokenizer_vocab} ids): ids past {vocab_size - 1} would have no "
        f"embedding row. To fix: set model.vocab_size to at least {tokenizer_vocab}."
    )


class DataConfig(Section):
    """Text corpus, tokenizer and sequence shape.

    ``source: python_stdlib`` reads the ``.py`` files of the running Python's standard library
    (present on every machine with Python, so the quickstart needs no download);
    ``source: files`` reads ``train_files`` / ``val_files`` (``.txt`` or ``.jsonl``, globs allowed).
    """

    resume = "critical"  # other text or other sequences: another run

    source: Literal["python_stdlib", "files"] = Field(
        "python_stdlib", description="Corpus: the Python standard library sources, or your files."
    )
    train_files: list[str] = Field(
        default_factory=list, description="Training files or globs (.txt, .jsonl) for source=files."
    )
    val_files: list[str] = Field(
        default_factory=list,
        description="Validation files or globs; empty: split val_fraction of the files off.",
    )
    text_field: str = Field("text", description="The key holding the text in .jsonl records.")
    val_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of files held out for validation, chosen by a hash of each file's "
        "relative path (deterministic on every machine).",
    )
    max_corpus_bytes: int | None = Field(
        None,
        ge=1,
        description="Read at most this many bytes of training text, files taken in sorted order "
        "(None: all). The validation side is capped in proportion: "
        "max_corpus_bytes * val_fraction / (1 - val_fraction).",
    )
    tokenizer: TokenizerSpec = Field(
        default_factory=TokenizerSpec,
        description="Tokenizer and its options: a name (byte: UTF-8 bytes, 256 ids) or "
        "{kind: name, <option>: value}.",
    )
    seq_len: int = Field(128, ge=2, description="Tokens per packed training sequence.")
    cache_dir: str | None = Field(
        None,
        json_schema_extra=FREE,
        description="Folder for token caches (numpy .npy files, memory-mapped on load), keyed by "
        "the file list, sizes, mtimes, tokenizer and seq_len; None: tokenize in memory each run.",
    )
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader worker processes (0: load in the training process).",
        json_schema_extra=FREE,
    )
    shuffle: bool = Field(True, description="Shuffle sequences each epoch (seeded).")

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and not self.train_files:
            raise ValueError("source 'files' needs train_files (a list of paths or globs)")
        return self
