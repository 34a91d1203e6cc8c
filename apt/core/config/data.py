"""``data:`` — where the text comes from and how it becomes token sequences."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from apt.core.config.base import Section
from apt.core.config.plugins import TokenizerSpec
from apt.core.config.resume import FREE

__all__ = ["TEXT_SOURCE_KEYS", "TOKENIZER_VOCAB", "DataConfig", "ShardSource", "vocab_mismatch"]

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


#: The ``data:`` keys that describe reading and splitting text; a shard folder was read and split
#: when it was prepared, so they do not apply to ``source: {kind: shards}``.
TEXT_SOURCE_KEYS = (
    "train_files",
    "val_files",
    "text_field",
    "val_fraction",
    "max_corpus_bytes",
    "cache_dir",
)


class ShardSource(Section):
    """``source: {kind: shards, path: DIR}``: a folder of token shards that ``python -m apt data
    prepare`` wrote (its ``index.json`` says what is in it). The folder need not exist when the
    config is loaded; the run that reads it says what is missing."""

    resume = "critical"  # other shards: other data

    kind: Literal["shards"] = Field("shards", description="Prepared token shards.")
    path: str = Field(
        min_length=1,
        description="The prepared folder (holding index.json); ~ is expanded, a relative path "
        "is taken from the working directory.",
    )


def _source_form(value: Any) -> str:
    return "shards" if isinstance(value, dict | ShardSource) else "name"


#: ``data.source``: a corpus name, or the mapping of a prepared shard folder. The tags keep a
#: bad mapping's errors to the mapping (a plain union also reports that it is no name).
SourceSpec = Annotated[
    Annotated[Literal["python_stdlib", "files"], Tag("name")]
    | Annotated[ShardSource, Tag("shards")],
    Discriminator(_source_form),
]
_SOURCE_FORMS = "python_stdlib, files or {kind: shards, path: DIR}"


class DataConfig(Section):
    """Text corpus, tokenizer and sequence shape.

    ``source: python_stdlib`` reads the ``.py`` files of the running Python's standard library
    (present on every machine with Python, so the quickstart needs no download);
    ``source: files`` reads ``train_files`` / ``val_files`` (``.txt`` or ``.jsonl``, globs allowed);
    ``source: {kind: shards, path: DIR}`` reads the ``train`` and ``val`` token shards of a
    prepared folder, made with the tokenizer its ``index.json`` names (the keys of
    :data:`TEXT_SOURCE_KEYS` do not apply to it and are refused).
    """

    resume = "critical"  # other text or other sequences: another run

    source: SourceSpec = Field(
        "python_stdlib",
        description="Corpus: python_stdlib (the standard library sources), files (your "
        "train_files / val_files), or {kind: shards, path: DIR} (prepared token shards).",
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
        "{kind: name, <option>: value}. Source shards: left at the default, the tokenizer "
        "index.json records; set, it must have the same fingerprint.",
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
    document_mask: bool = Field(
        False,
        description="Keep attention inside document boundaries of packed sequences (and restart "
        "positions at each document); source {kind: shards} only. The model must take "
        "document_ids (APT models do). Costs speed: attention runs with a mask.",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _one_of_the_forms(cls, value: Any) -> Any:
        if value == "shards" or (
            isinstance(value, dict) and value.get("kind") == "shards" and "path" not in value
        ):
            raise ValueError(
                "source 'shards' needs the prepared folder: source: {kind: shards, path: DIR}"
            )
        if not isinstance(value, str | dict | ShardSource) or (
            isinstance(value, str) and value not in ("python_stdlib", "files")
        ):
            raise ValueError(f"unknown source {value!r}; valid: {_SOURCE_FORMS}")
        if isinstance(value, dict) and value.get("kind") != "shards":
            raise ValueError(
                f"a mapping source must have kind: shards (got kind {value.get('kind')!r}); "
                f"valid: {_SOURCE_FORMS}"
            )
        return value

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and not self.train_files:
            raise ValueError("source 'files' needs train_files (a list of paths or globs)")
        if self.document_mask and not isinstance(self.source, ShardSource):
            raise ValueError(
                "document_mask needs source {kind: shards, path: DIR}: the document boundaries "
                "come from a prepared folder (python -m apt data prepare)"
            )
        return self

    @model_validator(mode="after")
    def _shards_take_no_text_keys(self) -> DataConfig:
        if not isinstance(self.source, ShardSource):
            return self
        fields = type(self).model_fields
        given = [
            key
            for key in TEXT_SOURCE_KEYS
            if getattr(self, key) != fields[key].get_default(call_default_factory=True)
        ]
        if given:
            raise ValueError(
                f"{', '.join(f'data.{key}' for key in given)} "
                f"{'does' if len(given) == 1 else 'do'} not apply to source "
                f"{{kind: shards}}: the folder {self.source.path} was read, split and tokenized "
                "when it was prepared. To fix: remove the key(s), or give them to "
                "`python -m apt data prepare` instead."
            )
        return self
