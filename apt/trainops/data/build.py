"""``build_datasets``: a ``data:`` config section -> packed train and validation datasets.

A text source (``python_stdlib``, ``files``) is read, split, tokenized and packed here; a shard
source (``{kind: shards, path: DIR}``) was all that when it was prepared, and is memory-mapped
(:class:`~apt.trainops.data.shards.dataset.ShardDataset`), with the tokenizer its
``index.json`` records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apt.core.config import TokenizerSpec
from apt.core.config.data import DataConfig, SFTSource, ShardSource
from apt.core.errors import ConfigError, DataError
from apt.trainops.data.cache import cache_key, load_tokens, save_tokens
from apt.trainops.data.corpus import CorpusFile, read_documents, resolve_files, stdlib_corpus
from apt.trainops.data.packing import (
    CorpusStats,
    PackedDataset,
    num_sequences,
    tokenize_documents,
)
from apt.trainops.data.shards.dataset import ShardDataset
from apt.trainops.data.shards.index import INDEX_FILE, ShardIndex, read_index
from apt.trainops.data.split import split_caps, split_files
from apt.trainops.data.tokenizers import (
    Tokenizer,
    build_tokenizer,
    token_dtype,
    tokenizer_fingerprint,
)

__all__ = ["DataBundle", "build_datasets", "data_tokenizer"]

_SOURCE_KEY = "data.source.path"


@dataclass(frozen=True)
class DataBundle:
    """What :func:`build_datasets` returns.

    Attributes:
        train: packed training sequences (a :class:`ShardDataset` for a shard source).
        val: packed validation sequences (likewise).
        tokenizer: the tokenizer both were encoded with (for decoding samples).
        description: one line for the run log (source, files, tokens, sequences, cache).
        train_stats: counts of the training side (a shard source: ``files`` counts shards and
            ``bytes`` is 0, since an index does not record the text bytes of a split).
        val_stats: counts of the validation side.
        train_files: the files of the training side, sorted (a byte cap may stop reading early;
            a shard source: its shard files, in stream order).
        val_files: the files of the validation side, sorted.
    """

    train: PackedDataset | ShardDataset
    val: PackedDataset | ShardDataset
    tokenizer: Tokenizer
    description: str
    train_stats: CorpusStats
    val_stats: CorpusStats
    train_files: tuple[Path, ...] = ()
    val_files: tuple[Path, ...] = ()


def _corpus_files(cfg: DataConfig) -> tuple[list[CorpusFile], list[CorpusFile]]:
    if cfg.source == "python_stdlib":
        return split_files(stdlib_corpus(), cfg.val_fraction, key="data.source 'python_stdlib'")
    train = resolve_files(cfg.train_files, key="data.train_files")
    if not cfg.val_files:
        return split_files(train, cfg.val_fraction, key="data.train_files")
    val = resolve_files(cfg.val_files, key="data.val_files")
    both = sorted({f.path.resolve() for f in train} & {f.path.resolve() for f in val})
    if both:
        raise DataError(
            f"{both[0]} is in both data.train_files and data.val_files"
            f"{f' (and {len(both) - 1} more)' if len(both) > 1 else ''}; validation on training "
            "text measures nothing. Remove it from one of the two lists."
        )
    return train, val


def _too_small(side: str, files: list[CorpusFile], tokens: int, seq_len: int, capped: bool) -> str:
    names = ", ".join(str(f.path) for f in files[:3]) + (", ..." if len(files) > 3 else "")
    fixes = "add text, or lower data.seq_len"
    if capped:
        fixes += ", or raise data.max_corpus_bytes"
    if side == "val":
        fixes += ", or raise data.val_fraction / list bigger data.val_files"
    return (
        f"the {'validation' if side == 'val' else 'training'} text ({len(files)} file(s): "
        f"{names}) is {tokens} tokens, too few for one sequence of data.seq_len={seq_len} "
        f"(needs {seq_len + 1}). To fix: {fixes}."
    )


def _load_side(
    side: str,
    files: list[CorpusFile],
    cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    max_bytes: int | None,
) -> tuple[PackedDataset, CorpusStats, bool]:
    """Tokens of one side, from the cache when possible. Returns (dataset, stats, cache_hit)."""
    dtype = token_dtype(tokenizer.vocab_size)
    key = None
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir is not None else None
    if cache_dir is not None:
        key = cache_key(
            files,
            tokenizer=tokenizer,
            seq_len=seq_len,
            text_field=cfg.text_field,
            max_bytes=max_bytes,
        )
        hit = load_tokens(cache_dir, side, key, dtype)
        if hit is not None:
            tokens, stats, cached_path = hit
            if num_sequences(len(tokens), seq_len) < 1:
                raise DataError(
                    _too_small(side, files, len(tokens), seq_len, max_bytes is not None)
                )
            return PackedDataset(tokens, seq_len, path=cached_path), stats, True

    read: set[Path] = set()

    def texts() -> Iterator[str]:
        for file, text in read_documents(files, text_field=cfg.text_field, max_bytes=max_bytes):
            read.add(file.path)
            yield text

    array, stats = tokenize_documents(texts(), tokenizer)
    stats = dataclasses.replace(stats, files=len(read))
    if num_sequences(len(array), seq_len) < 1:
        raise DataError(_too_small(side, files, len(array), seq_len, max_bytes is not None))
    path: Path | None = None
    if cache_dir is not None and key is not None:
        array, path = save_tokens(cache_dir, side, key, np.ascontiguousarray(array), stats)
    return PackedDataset(array, seq_len, path=path), stats, False


def _describe(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    sides: dict[str, tuple[PackedDataset, CorpusStats, bool]],
) -> str:
    parts = []
    for side, (dataset, stats, hit) in sides.items():
        parts.append(
            f"{side} {stats.files} files / {stats.documents} docs / {stats.tokens:,} tokens "
            f"-> {len(dataset):,} seqs{' (cached)' if hit else ''}"
        )
    cap = f", cap {cfg.max_corpus_bytes:,} B" if cfg.max_corpus_bytes else ""
    return (
        f"data {cfg.source}{cap}, tokenizer {tokenizer.name} ({tokenizer.vocab_size}), "
        f"seq_len {seq_len}: " + "; ".join(parts)
    )


def _spec_text(spec: TokenizerSpec) -> str:
    """``byte``, or ``{kind: bpe, path: x}`` for a spec with options."""
    if not spec.options:
        return spec.kind
    options = ", ".join(f"{key}: {value}" for key, value in sorted(spec.options.items()))
    return f"{{kind: {spec.kind}, {options}}}"


def _shard_tokenizer(cfg: DataConfig, folder: Path, index: ShardIndex) -> Tokenizer:
    """The tokenizer ``index`` records, or ``cfg.tokenizer`` when the user chose one that makes
    the same ids (same fingerprint)."""
    recorded = TokenizerSpec.model_validate(index.tokenizer.spec)
    where = folder / INDEX_FILE
    if cfg.tokenizer != TokenizerSpec():  # chosen by the user, not left at the default
        chosen = build_tokenizer(cfg.tokenizer)
        if tokenizer_fingerprint(chosen) != index.tokenizer.fingerprint:
            raise ConfigError(
                f"data.tokenizer: {_spec_text(cfg.tokenizer)} (fingerprint "
                f"{tokenizer_fingerprint(chosen)[:12]}) is not the tokenizer the shards in "
                f"{folder} were made with: {_spec_text(recorded)} (fingerprint "
                f"{index.tokenizer.fingerprint[:12]}, {where}). To fix: remove data.tokenizer "
                "from the config (a shard source uses the tokenizer of its index), or prepare "
                "the folder again with the tokenizer you want."
            )
        return chosen
    try:
        tokenizer = build_tokenizer(recorded)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the shards' tokenizer cannot be built here: {exc}") from None
    if tokenizer_fingerprint(tokenizer) != index.tokenizer.fingerprint:
        raise DataError(
            f"{where}: the shards were made with tokenizer {_spec_text(recorded)} of "
            f"fingerprint {index.tokenizer.fingerprint[:12]}; built here it has fingerprint "
            f"{tokenizer_fingerprint(tokenizer)[:12]} (its vocabulary or options changed), so "
            "the ids would mean other text. To fix: restore that tokenizer, or prepare the "
            "folder again."
        )
    return tokenizer


def data_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer the data of ``cfg`` is encoded with: ``cfg.tokenizer``; for a shard source,
    the one its ``index.json`` records (``cfg.tokenizer`` left at its default), or
    ``cfg.tokenizer`` when it has the same fingerprint. For ``val_bpb`` and for decoding.

    Raises:
        ConfigError: an unregistered tokenizer, or a ``cfg.tokenizer`` that is not the shards'.
        DataError: the shard folder or its index is missing or unreadable, or the recorded
            tokenizer now builds with another fingerprint.
    """
    if isinstance(cfg.source, ShardSource):
        folder = Path(cfg.source.path).expanduser()
        return _shard_tokenizer(cfg, folder, read_index(folder, key=_SOURCE_KEY))
    return build_tokenizer(cfg.tokenizer)


def _shard_bundle(cfg: DataConfig, source: ShardSource, seq_len: int) -> DataBundle:
    folder = Path(source.path).expanduser()
    index = read_index(folder, key=_SOURCE_KEY)
    tokenizer = _shard_tokenizer(cfg, folder, index)
    docs = cfg.document_mask
    train = ShardDataset(folder, "train", seq_len, index=index, key=_SOURCE_KEY, document_ids=docs)
    val = ShardDataset(folder, "val", seq_len, index=index, key=_SOURCE_KEY, document_ids=docs)
    stats = {
        side: CorpusStats(
            files=len(data.files),
            documents=index.splits[side].documents,
            bytes=0,
            tokens=data.num_tokens,
        )
        for side, data in (("train", train), ("val", val))
    }
    parts = [
        f"{side} {len(data.files)} shards / {stats[side].documents} docs / "
        f"{data.num_tokens:,} tokens -> {len(data):,} seqs"
        for side, data in (("train", train), ("val", val))
    ]
    shown = cfg.tokenizer  # the user's (checked), or the index's when left at the default
    if shown == TokenizerSpec():
        shown = TokenizerSpec.model_validate(index.tokenizer.spec)
    description = (
        f"data shards {folder} ({index.dtype}), tokenizer {_spec_text(shown)} "
        f"({tokenizer.vocab_size}), seq_len {seq_len}: " + "; ".join(parts)
    )
    return DataBundle(
        train=train,
        val=val,
        tokenizer=tokenizer,
        description=description,
        train_stats=stats["train"],
        val_stats=stats["val"],
        train_files=tuple(folder / name for name in train.files),
        val_files=tuple(folder / name for name in val.files),
    )


def build_datasets(cfg: DataConfig, *, seq_len: int | None = None) -> DataBundle:
    """Read, split, tokenize and pack the corpus ``cfg`` describes.

    Args:
        cfg: the ``data:`` section.
        seq_len: tokens per sequence; None: ``cfg.seq_len``. (The engine passes the model's
            context length when it is the shorter of the two.)

    Returns:
        The train and validation datasets, the tokenizer and a one-line description. A shard
        source gives :class:`ShardDataset` windows of its ``train`` and ``val`` splits.

    Raises:
        DataError: no files matched, a file is unreadable or malformed, a side is too small
            for one sequence, or the cache folder is not writable; the message says which file
            (and line) and what to change. A shard source: no folder or ``index.json``, no
            ``val`` split, a shard missing or of the wrong size.
        ConfigError: ``cfg.tokenizer`` is not a registered tokenizer, (shard source) not
            the tokenizer the shards were made with, or an ``sft`` source (read by
            :func:`~apt.trainops.data.sft.build_sft_datasets`, for the ``sft`` task).
    """
    seq_len = cfg.seq_len if seq_len is None else seq_len
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if isinstance(cfg.source, ShardSource):
        return _shard_bundle(cfg, cfg.source, seq_len)
    if isinstance(cfg.source, SFTSource):
        raise ConfigError(
            f"data.source: {{kind: sft, path: {cfg.source.path}}} holds fine-tuning examples, "
            "which the sft task reads (its labels cover the completions only). To fix: set "
            "training.task: sft, or read them with apt.trainops.data.build_sft_datasets."
        )
    tokenizer = build_tokenizer(cfg.tokenizer)
    train_files, val_files = _corpus_files(cfg)
    train_cap, val_cap = split_caps(cfg.max_corpus_bytes, cfg.val_fraction)
    sides = {
        "train": _load_side("train", train_files, cfg, tokenizer, seq_len, train_cap),
        "val": _load_side("val", val_files, cfg, tokenizer, seq_len, val_cap),
    }
    (train, train_stats, _), (val, val_stats, _) = sides["train"], sides["val"]
    return DataBundle(
        train=train,
        val=val,
        tokenizer=tokenizer,
        description=_describe(cfg, tokenizer, seq_len, sides),
        train_stats=train_stats,
        val_stats=val_stats,
        train_files=tuple(f.path for f in train_files),
        val_files=tuple(f.path for f in val_files),
    )
