"""``data``: prepare token shards, train a tokenizer.

    python -m apt data prepare --input 'corpus/**/*.jsonl' --output data/corpus-byte
    python -m apt data tokenizer --input 'corpus/*.txt' --vocab-size 16384 --output tok/
    python -m apt data prepare --input 'corpus/*.txt' --output data/corpus-bpe --tokenizer tok/

Bad input (a glob that matches nothing, an unreadable file, a bad .jsonl line, a missing
Parquet column, an output folder that is a file or holds another preparation) ends the command
with exit code 2 and one line naming the file, the line and the fix. Building the parser
imports nothing heavy; the commands import the data pipeline when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from apt.core.errors import ConfigError, DataError

__all__ = ["add_data_parser", "cmd_data"]

log = logging.getLogger("apt")

# Spelled out here so that building the parser imports no torch; a test checks they agree with
# apt.trainops.data.shards.prepare.
_SHARD_TOKENS = 100_000_000
_VAL_FRACTION = 0.01


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def add_data_parser(sub: Any) -> None:
    """Register ``data prepare`` and ``data tokenizer`` on the CLI's subparsers."""
    data = sub.add_parser("data", help="prepare token shards, train a BPE tokenizer")
    dsub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = dsub.add_parser(
        "prepare", help="tokenize .txt/.jsonl/.parquet files once into token shards"
    )
    prep.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="files or globs (quote them: '**/*.jsonl'); repeatable",
    )
    prep.add_argument("--output", required=True, metavar="DIR", help="the shard folder")
    prep.add_argument(
        "--tokenizer",
        default="byte",
        metavar="SPEC",
        help="byte (default), another registered name, or a tokenizer.json / its folder (bpe)",
    )
    prep.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="tokenizing processes (default: 1 for byte, which encodes faster than text "
        "travels to a process; else the CPUs this process may use)",
    )
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=_VAL_FRACTION,
        metavar="F",
        help=f"share of documents for the val split, 0 for none (default {_VAL_FRACTION})",
    )
    prep.add_argument(
        "--shard-tokens",
        type=int,
        default=_SHARD_TOKENS,
        metavar="N",
        help=f"tokens per shard file (default {_SHARD_TOKENS:_})",
    )
    prep.add_argument(
        "--text-field", default="text", help="the .jsonl key / Parquet column of the text"
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    tok = dsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on your text")
    tok.add_argument("--input", nargs="+", action="extend", required=True, metavar="PATH")
    tok.add_argument("--vocab-size", type=int, required=True, metavar="N", help="ids to learn")
    tok.add_argument("--output", required=True, metavar="DIR", help="where tokenizer.json goes")
    tok.add_argument("--text-field", default="text", help="the .jsonl key of the text")


def tokenizer_spec(value: str) -> dict[str, Any]:
    """The ``data.tokenizer`` spec ``--tokenizer`` names: a registered name (``byte``) as it
    is, a path (a tokenizer.json or its folder) as ``{"kind": "bpe", "path": <absolute>}``.

    Raises:
        ConfigError: neither a registered name nor an existing path.
    """
    from apt.trainops.data.tokenizers import TOKENIZERS

    if value in TOKENIZERS:
        return {"kind": value}
    path = Path(value).expanduser()
    if path.exists():
        return {"kind": "bpe", "path": str(path.resolve())}
    raise ConfigError(
        f"--tokenizer {value!r}: neither a tokenizer name ({', '.join(TOKENIZERS.names())}) nor "
        "an existing tokenizer.json or folder. Train one with `python -m apt data tokenizer`."
    )


def cmd_data(args: argparse.Namespace) -> int:
    try:
        if args.action == "prepare":
            return _prepare(args)
        return _train_tokenizer(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    from apt.trainops.data.shards.prepare import prepare_shards

    spec = tokenizer_spec(args.tokenizer)
    workers = args.workers
    if workers is None:
        workers = 1 if spec["kind"] == "byte" else _cpus()
    index = prepare_shards(
        args.input,
        args.output,
        tokenizer_spec=spec,
        workers=workers,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        text_field=args.text_field,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    for name, split in index.splits.items():
        print(
            f"{name}: {split.tokens:,} tokens, {split.documents:,} documents, "
            f"{len(split.shards)} shard(s) ({index.dtype})"
        )
    print(f"shards in {Path(args.output).resolve()}")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from apt.trainops.data.bpe import train_bpe

    path = train_bpe(
        list(args.input),
        vocab_size=args.vocab_size,
        output=Path(args.output),
        text_field=args.text_field,
    )
    print(f"tokenizer written to {path}")
    print(f"use it: python -m apt data prepare --tokenizer {path.parent} ...")
    return 0
