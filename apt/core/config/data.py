"""``data:`` — where the text comes from and how it becomes token sequences."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from apt.core.config.base import Section
from apt.core.config.plugins import TokenizerSpec
from apt.core.config.resume import FREE

__all__ = [
    "TEXT_SOURCE_KEYS",
    "TOKENIZER_VOCAB",
    "DataConfig",
    "SFTSource",
    "ShardSource",
    "vocab_mismatch",
]

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
#: when it was prepared, and an ``sft`` source reads and splits its own files, so they do not
#: apply to ``source: {kind: shards}`` or ``source: {kind: sft}``.
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


class SFTSource(Section):
    """``source: {kind: sft, path: FILE}``: supervised fine-tuning examples, one JSON object a
    line: ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role": ..., "content":
    ...}, ...]}`` (roles system, user, assistant). Each example is rendered by a chat template
    and the loss covers the completion (assistant) tokens only. Read by ``training.task: sft``;
    the files need not exist when the config is loaded."""

    resume = "critical"  # other examples, or the same ones cut otherwise: other data

    kind: Literal["sft"] = Field("sft", description="Supervised fine-tuning examples (.jsonl).")
    path: str = Field(
        min_length=1,
        description="The training .jsonl file; ~ is expanded, a relative path is taken from "
        "the working directory.",
    )
    val_path: str | None = Field(
        None,
        min_length=1,
        description="The validation .jsonl file; None: hold out val_fraction of the training "
        "examples, chosen by a permutation seeded with training.seed.",
    )
    val_fraction: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Share of the examples of path held out for validation (at least one) when "
        "val_path is not set.",
    )
    format: Literal["auto", "prompt_completion", "messages"] = Field(
        "auto",
        description="Record layout: prompt_completion ({prompt, completion}), messages "
        "({messages: [{role, content}]}) or auto (each line by the keys it has).",
    )
    template: Literal["builtin", "tokenizer", "plain"] = Field(
        "builtin",
        description="How an example becomes text: builtin (role markers <|user|> ... <|end|>, "
        "the tokenizer's special tokens where it has them, else plain text; no jinja2 needed), "
        "tokenizer (the chat_template of the tokenizer folder's tokenizer_config.json; needs "
        "jinja2) or plain (the contents back to back between end-of-text tokens, no markers).",
    )
    packing: bool = Field(
        True,
        description="Pack several examples into each data.seq_len row, attention kept inside "
        "each example (document_ids; the model must take them, as APT models do). False: one "
        "example a row, batches padded to their longest example.",
    )
    padding_free: bool = Field(
        False,
        description="Join each micro-batch's examples into one row of their total length, no "
        "padding, attention kept inside each example (document_ids; pair with "
        "model.document_attention varlen or flex so attention costs the sum of the examples' "
        "squared lengths). Takes examples one by one, so packing does not apply.",
    )
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="An example longer than data.seq_len + 1 tokens: truncate (keep its first "
        "tokens; one left with no completion token is dropped; counts logged), drop (leave it "
        "out, counted) or error (refuse, naming its file and line).",
    )

    @model_validator(mode="after")
    def _one_batch_layout(self) -> SFTSource:
        if self.padding_free and self.packing and "packing" in self.model_fields_set:
            raise ValueError(
                "packing: true and padding_free: true are two batch layouts: padding_free joins "
                "a micro-batch's examples into one row by itself; set packing: false (or leave "
                "it out)"
            )
        return self

    @model_validator(mode="after")
    def _one_validation_side(self) -> SFTSource:
        if self.val_path is not None and "val_fraction" in self.model_fields_set:
            raise ValueError(
                "give val_path (a validation file) or val_fraction (a share of path held "
                "out), not both"
            )
        return self


_MAPPING_SOURCES: dict[str, type[Section]] = {"shards": ShardSource, "sft": SFTSource}


def _source_form(value: Any) -> str:
    if isinstance(value, ShardSource | SFTSource):
        return str(value.kind)
    if isinstance(value, dict):
        return str(value.get("kind"))
    return "name"


#: ``data.source``: a corpus name, or the mapping of a prepared shard folder or of fine-tuning
#: examples. The tags keep a bad mapping's errors to the mapping (a plain union also reports
#: that it is no name).
SourceSpec = Annotated[
    Annotated[Literal["python_stdlib", "files"], Tag("name")]
    | Annotated[ShardSource, Tag("shards")]
    | Annotated[SFTSource, Tag("sft")],
    Discriminator(_source_form),
]
_SOURCE_FORMS = "python_stdlib, files, {kind: shards, path: DIR} or {kind: sft, path: FILE.jsonl}"


class DataConfig(Section):
    """Text corpus, tokenizer and sequence shape.

    ``source: python_stdlib`` reads the ``.py`` files of the running Python's standard library
    (present on every machine with Python, so the quickstart needs no download);
    ``source: files`` reads ``train_files`` / ``val_files`` (``.txt`` or ``.jsonl``, globs allowed);
    ``source: {kind: shards, path: DIR}`` reads the ``train`` and ``val`` token shards of a
    prepared folder, made with the tokenizer its ``index.json`` names;
    ``source: {kind: sft, path: FILE.jsonl}`` reads prompt/completion or chat examples for
    ``training.task: sft`` (:class:`SFTSource`). The keys of :data:`TEXT_SOURCE_KEYS` apply to
    neither mapping source and are refused beside one.
    """

    resume = "critical"  # other text or other sequences: another run

    source: SourceSpec = Field(
        "python_stdlib",
        description="Corpus: python_stdlib (the standard library sources), files (your "
        "train_files / val_files), {kind: shards, path: DIR} (prepared token shards) or "
        "{kind: sft, path: FILE.jsonl} (fine-tuning examples for training.task: sft).",
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
        if value == "sft" or (
            isinstance(value, dict) and value.get("kind") == "sft" and "path" not in value
        ):
            raise ValueError(
                "source 'sft' needs the examples file: source: {kind: sft, path: FILE.jsonl}"
            )
        if not isinstance(value, str | dict | ShardSource | SFTSource) or (
            isinstance(value, str) and value not in ("python_stdlib", "files")
        ):
            raise ValueError(f"unknown source {value!r}; valid: {_SOURCE_FORMS}")
        if isinstance(value, dict) and value.get("kind") not in _MAPPING_SOURCES:
            raise ValueError(
                f"a mapping source must have kind: shards or sft (got kind "
                f"{value.get('kind')!r}); valid: {_SOURCE_FORMS}"
            )
        return value

    @model_validator(mode="after")
    def _files_given(self) -> DataConfig:
        if self.source == "files" and not self.train_files:
            raise ValueError("source 'files' needs train_files (a list of paths or globs)")
        if self.document_mask and isinstance(self.source, SFTSource):
            raise ValueError(
                "document_mask does not apply to source {kind: sft}: packed examples always "
                "keep attention inside each example (data.source.packing). To fix: remove "
                "data.document_mask"
            )
        if self.document_mask and not isinstance(self.source, ShardSource):
            raise ValueError(
                "document_mask needs source {kind: shards, path: DIR}: the document boundaries "
                "come from a prepared folder (python -m apt data prepare)"
            )
        return self

    @model_validator(mode="after")
    def _mappings_take_no_text_keys(self) -> DataConfig:
        if not isinstance(self.source, ShardSource | SFTSource):
            return self
        fields = type(self).model_fields
        given = [
            key
            for key in TEXT_SOURCE_KEYS
            if getattr(self, key) != fields[key].get_default(call_default_factory=True)
        ]
        if given and isinstance(self.source, SFTSource):
            raise ValueError(
                f"{', '.join(f'data.{key}' for key in given)} "
                f"{'does' if len(given) == 1 else 'do'} not apply to source {{kind: sft}}: it "
                f"reads {self.source.path} (and data.source.val_path) itself. To fix: remove "
                "the key(s); a held-out share of the examples is data.source.val_fraction."
            )
        if given:
            raise ValueError(
                f"{', '.join(f'data.{key}' for key in given)} "
                f"{'does' if len(given) == 1 else 'do'} not apply to source "
                f"{{kind: shards}}: the folder {self.source.path} was read, split and tokenized "
                "when it was prepared. To fix: remove the key(s), or give them to "
                "`python -m apt data prepare` instead."
            )
        return self
