"""``build_sft_datasets``: a ``data:`` section with ``source: {kind: sft}`` -> train and
validation datasets of fine-tuning examples.

Read (:mod:`~apt.trainops.data.sft.examples`), split (``val_path``, or a share held out by a
permutation seeded with the run's seed), rendered and encoded
(:mod:`~apt.trainops.data.sft.templates`), cut to ``seq_len`` (``overlong``), then packed or
not (:mod:`~apt.trainops.data.sft.dataset`). Every step is deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apt.core.config.data import DataConfig, SFTSource
from apt.core.errors import ConfigError, DataError
from apt.trainops.data.sft.dataset import EncodedExamples, PackedSFTDataset, SFTDataset
from apt.trainops.data.sft.examples import Example, read_examples
from apt.trainops.data.sft.templates import ChatTemplate, build_template, encode_pieces
from apt.trainops.data.tokenizers import Tokenizer, build_tokenizer

__all__ = [
    "SFTBundle",
    "SFTStats",
    "build_sft_datasets",
    "build_sft_from_examples",
    "encode_example",
    "split_examples",
]

log = logging.getLogger("apt")


@dataclass(frozen=True)
class SFTStats:
    """What one side of the fine-tuning data holds, for the run log.

    Attributes:
        examples: examples kept (truncated ones included).
        truncated: examples cut to ``seq_len + 1`` tokens (``overlong: truncate``).
        dropped: examples left out: too long (``overlong: drop``), or cut to no completion
            token (``overlong: truncate``).
        positions: input positions over the kept examples (padding excluded).
        targets: completion tokens the loss covers.
        rows: dataset rows (packed rows, or examples).
    """

    examples: int
    truncated: int
    dropped: int
    positions: int
    targets: int
    rows: int


@dataclass(frozen=True)
class SFTBundle:
    """What :func:`build_sft_datasets` returns.

    Attributes:
        train: the training rows.
        val: the validation rows.
        tokenizer: the tokenizer the examples were encoded with.
        template: the chat template they were rendered with (for generation prompts).
        description: one line for the run log.
        train_stats: counts of the training side.
        val_stats: counts of the validation side.
    """

    train: SFTDataset | PackedSFTDataset
    val: SFTDataset | PackedSFTDataset
    tokenizer: Tokenizer
    template: ChatTemplate
    description: str
    train_stats: SFTStats
    val_stats: SFTStats


def encode_example(
    example: Example, template: ChatTemplate, tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, trained)`` of one example: int64 token ids and the bool mask of those the loss
    covers.

    Raises:
        DataError: the template cannot render it, or it has no completion token (the message
            names the example's file and line).
    """
    try:
        pieces = template.pieces(example.messages, add_generation_prompt=False)
    except DataError as exc:
        raise DataError(f"{example.where}: {exc}") from None
    ids, trained = encode_pieces(pieces, tokenizer)
    if not trained[1:].any():
        raise DataError(
            f"{example.where}: the {template.name} template gives this example no completion "
            "token to learn. Check its assistant turns, or use data.source.template: builtin."
        )
    return ids, trained


def split_examples(
    examples: Sequence[Example], fraction: float, *, seed: int, key: str
) -> tuple[list[Example], list[Example]]:
    """``(train, val)``: ``round(len * fraction)`` examples (at least one) held out by a
    permutation seeded with ``seed``; both sides keep the file order.

    Raises:
        DataError: fewer than two examples.
    """
    n = len(examples)
    if n < 2:
        raise DataError(
            f"{key}: {n} example cannot be split into training and validation examples. To "
            "fix: add examples, or give a validation file as data.source.val_path."
        )
    held = min(n - 1, max(1, round(n * fraction)))
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:held]] = True
    return (
        [e for e, out in zip(examples, chosen, strict=True) if not out],
        [e for e, out in zip(examples, chosen, strict=True) if out],
    )


def _encode_side(
    side: str,
    examples: Sequence[Example],
    source: SFTSource,
    *,
    template: ChatTemplate,
    tokenizer: Tokenizer,
    seq_len: int,
) -> tuple[EncodedExamples, int, int]:
    """The examples encoded and cut to ``seq_len + 1`` tokens; also (truncated, dropped)."""
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = dropped = 0
    for example in examples:
        ids, trained = encode_example(example, template, tokenizer)
        if len(ids) - 1 <= seq_len:
            kept.append((ids, trained))
            continue
        if source.overlong == "error":
            raise DataError(
                f"{example.where}: the example is {len(ids)} tokens, more than data.seq_len + 1 "
                f"= {seq_len + 1}. To fix: raise data.seq_len (and model.max_seq_len), shorten "
                "the example, or set data.source.overlong: truncate or drop."
            )
        if source.overlong == "truncate":
            truncated += 1
            ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
            if trained[1:].any():
                kept.append((ids, trained))
                continue
        dropped += 1
    if not kept:
        raise DataError(
            f"data.source: every one of the {len(examples)} {side} example(s) is longer than "
            f"data.seq_len={seq_len} and none is left (overlong: {source.overlong}). To fix: "
            "raise data.seq_len (and model.max_seq_len), or shorten the examples."
        )
    if truncated or dropped:
        log.warning(
            "data.source sft: %d of %d %s examples are longer than data.seq_len=%d: %d "
            "truncated, %d dropped (overlong: %s). Raise data.seq_len to keep them whole.",
            truncated if source.overlong == "truncate" else dropped,
            len(examples),
            side,
            seq_len,
            truncated,
            dropped,
            source.overlong,
        )
    return EncodedExamples.join(kept), truncated, dropped


def _sides(cfg: SFTSource, *, seed: int) -> tuple[list[Example], list[Example]]:
    train = read_examples(cfg.path, fmt=cfg.format, key="data.source.path")
    if cfg.val_path is None:
        return split_examples(train, cfg.val_fraction, seed=seed, key="data.source.path")
    if Path(cfg.val_path).expanduser().resolve() == Path(cfg.path).expanduser().resolve():
        raise DataError(
            f"data.source.val_path: {cfg.val_path} is data.source.path too; validation on "
            "training examples measures nothing. Give another file, or leave val_path unset to "
            "hold out data.source.val_fraction of the examples."
        )
    return train, read_examples(cfg.val_path, fmt=cfg.format, key="data.source.val_path")


def build_sft_datasets(cfg: DataConfig, *, seed: int, seq_len: int | None = None) -> SFTBundle:
    """Read, split, render, encode and pack the fine-tuning examples ``cfg.source`` names.

    Args:
        cfg: the ``data:`` section; its source must be ``{kind: sft, ...}``.
        seed: the run's seed: it chooses the held-out examples (no ``val_path``).
        seq_len: positions per row; None: ``cfg.seq_len``.

    Returns:
        The train and validation datasets (:class:`PackedSFTDataset` with ``packing``, else
        :class:`SFTDataset`), the tokenizer, the template and their counts.

    Raises:
        ConfigError: the source is not ``sft``, an unregistered tokenizer, or a template the
            tokenizer cannot give (no chat template, no jinja2).
        DataError: a missing or bad file or record (file and line named), too few examples to
            split, an example too long under ``overlong: error``, or a side left empty.
    """
    source = cfg.source
    if not isinstance(source, SFTSource):
        raise ConfigError(
            f"training.task: sft reads data.source: {{kind: sft, path: FILE.jsonl}}; the "
            f"source is {source if isinstance(source, str) else '{kind: ' + source.kind + '}'}. "
            "To fix: set data.source to your examples, or train another task."
        )
    train, val = _sides(source, seed=seed)
    return build_sft_from_examples(
        train,
        val,
        source,
        tokenizer=build_tokenizer(cfg.tokenizer),
        seq_len=cfg.seq_len if seq_len is None else seq_len,
    )


def build_sft_from_examples(
    train: Sequence[Example],
    val: Sequence[Example],
    source: SFTSource,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
) -> SFTBundle:
    """Render, encode and pack examples already read (:func:`build_sft_datasets` reads them
    from ``source.path``; ``Finetuner(train_dataset=[{...}, ...])`` has them in memory).

    Args:
        train / val: the two sides.
        source: the template, packing and overlong options (its paths are not read).
        tokenizer: what encodes the text.
        seq_len: positions per row.

    Raises:
        ConfigError: a template the tokenizer cannot give.
        DataError: an example too long under ``overlong: error``, or a side left empty.
    """
    template = build_template(source.template, tokenizer)
    built = {}
    for side, examples in (("train", train), ("val", val)):
        encoded, truncated, dropped = _encode_side(
            side, examples, source, template=template, tokenizer=tokenizer, seq_len=seq_len
        )
        data: SFTDataset | PackedSFTDataset = (
            PackedSFTDataset(encoded, seq_len, pad_id=tokenizer.eos_id)
            if source.packing and not source.padding_free
            else SFTDataset(encoded, seq_len)
        )
        positions = int(encoded.offsets[-1]) - len(encoded)
        stats = SFTStats(
            len(encoded), truncated, dropped, positions, encoded.num_targets, len(data)
        )
        built[side] = (data, stats)
    parts = [
        f"{side} {s.examples} examples / {s.targets:,} completion tokens -> {s.rows:,} "
        + (
            f"rows ({s.positions / (s.rows * seq_len):.0%} full)"
            if source.packing and not source.padding_free
            else "rows"
        )
        for side, (_, s) in built.items()
    ]
    layout = (
        "padding-free (a batch's examples in one row)"
        if source.padding_free
        else "packed"
        if source.packing
        else "one example a row"
    )
    description = (
        f"data sft {source.path} ({template.description}), tokenizer {tokenizer.name} "
        f"({tokenizer.vocab_size}), seq_len {seq_len}, {layout}: " + "; ".join(parts)
    )
    return SFTBundle(
        train=built["train"][0],
        val=built["val"][0],
        tokenizer=tokenizer,
        template=template,
        description=description,
        train_stats=built["train"][1],
        val_stats=built["val"][1],
    )
