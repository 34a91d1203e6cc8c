"""``eval``: score a saved model or a checkpoint on a text file, print and save the metrics.

    python -m apt eval --model runs/tiny/final_model --data notes.txt
    python -m apt eval --checkpoint runs/tiny/checkpoints --data corpus/ --metrics loss bpb

The text is tokenized (the tokenizer saved with the model or run, else the one its config names),
packed into sequences as training packs it, and scored by
:class:`~apt.trainops.eval.Evaluator`. Input that cannot be used (a missing or wrong folder, a
checkpoint that fails verification, no text) ends the command with exit code 2 and one line
naming the path and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt.core.errors import CheckpointError, ConfigError, DataError

__all__ = ["METRIC_NAMES", "add_eval_parser", "cmd_eval"]

log = logging.getLogger("apt")

#: The names ``--metrics`` takes: ``apt.trainops.eval.METRICS``, spelled out so that building the
#: parser imports no torch (a test checks that both agree).
METRIC_NAMES = ("loss", "perplexity", "accuracy", "entropy", "bpb")


def add_eval_parser(sub: Any) -> None:
    """Register ``eval`` and its flags on the CLI's subparsers."""
    ev = sub.add_parser("eval", help="score a saved model or a checkpoint on a text file")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="a folder written by save_pretrained")
    source.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a checkpoint step folder, or a checkpoints folder (its newest good checkpoint)",
    )
    ev.add_argument("--data", required=True, metavar="PATH", help="a UTF-8 text file or folder")
    ev.add_argument(
        "--metrics",
        nargs="+",
        metavar="NAME",
        help=f"what to compute, in order, among {', '.join(METRIC_NAMES)} (default: all)",
    )
    ev.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences per batch")
    ev.add_argument(
        "--seq-len", type=int, metavar="N", help="tokens per sequence (default: max_seq_len)"
    )
    ev.add_argument("--max-batches", type=int, metavar="N", help="stop after N batches")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ev.add_argument(
        "--tokenizer",
        metavar="NAME|PATH",
        help="byte, or a tokenizer.json / tokenizer folder (default: the one saved with the "
        "model or run, else the run config's, else byte)",
    )
    ev.add_argument("--json", metavar="OUT", help="where to write the metrics as JSON")


@dataclass
class _Loaded:
    """A model ready to score, and what the report says about where it came from."""

    model: Any
    tokenizer: Any  # a Tokenizer, or the data.tokenizer spec to build one
    source: dict[str, Any]
    json_path: Path


def cmd_eval(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "seq_len", "max_batches"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    from apt.trainops.eval.metrics import METRICS, check_metric_names

    metrics = check_metric_names(args.metrics or METRICS, where="--metrics")
    device = _device(args.device)
    try:
        loaded = _load_model(args)
        tokenizer = _tokenizer(args.tokenizer, loaded.tokenizer)
        config = loaded.model.config
        if config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"the model has {config.vocab_size} token ids, fewer than the {tokenizer.name} "
                f"tokenizer's {tokenizer.vocab_size}; pass --tokenizer NAME with the tokenizer "
                "it was trained with"
            )
        seq_len = _seq_len(args.seq_len, config.max_seq_len)
        dataset, stats = _text_dataset(Path(args.data), tokenizer, seq_len)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {
        "metrics": _evaluate(args, loaded.model, dataset, tokenizer, metrics, device),
        **loaded.source,
        "data": str(Path(args.data).resolve()),
        "tokenizer": tokenizer.name,
        "seq_len": seq_len,
        "sequences": len(dataset),
        "text_bytes": stats.bytes,
    }
    _print_table(report)
    return _write_report(Path(args.json) if args.json else loaded.json_path, report)


def _evaluate(
    args: argparse.Namespace,
    model: Any,
    dataset: Any,
    tokenizer: Any,
    metrics: tuple[str, ...],
    device: Any,
) -> dict[str, float]:
    """The metrics of ``model`` on ``dataset`` (the first ``--max-batches`` batches)."""
    from apt.trainops.eval import Evaluator, token_byte_lengths

    evaluator = Evaluator(
        model=model.to(device),
        eval_dataset=dataset,
        metrics=metrics,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=device,
        token_bytes=token_byte_lengths(tokenizer) if "bpb" in metrics else None,
    )
    return evaluator.evaluate() or {}


def _device(name: str) -> Any:
    """The torch device ``--device`` names.

    Raises:
        ConfigError: a form that is not a device, or a device this machine does not have.
    """
    import torch

    from apt.core.config.devices import DEVICE_FORMS, is_device_form

    if not is_device_form(name):
        raise ConfigError(f"--device {name!r}: use one of {', '.join(DEVICE_FORMS)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count()
    missing = (name.startswith("cuda") and int(name.partition(":")[2] or 0) >= gpus) or (
        name == "mps" and not torch.backends.mps.is_available()
    )
    if missing:
        raise ConfigError(
            f"--device {name}: this machine has no such device ({gpus} CUDA device(s)); use "
            "--device auto (CUDA when present, else the CPU) or --device cpu"
        )
    return torch.device(name)


def _seq_len(wanted: int | None, max_seq_len: int) -> int:
    if wanted is None:
        return max_seq_len
    if wanted > max_seq_len:
        log.warning(
            "--seq-len %d is longer than the model's max_seq_len: using %d", wanted, max_seq_len
        )
        return max_seq_len
    return wanted


def _load_model(args: argparse.Namespace) -> _Loaded:
    if args.model is not None:
        return _load_pretrained(Path(args.model))
    return _load_checkpoint(Path(args.checkpoint))


def _load_pretrained(folder: Path) -> _Loaded:
    """An APT model from a ``save_pretrained`` folder.

    Raises:
        CheckpointError: no such folder, a folder that is not a model's, or bad files.
    """
    from apt.model import APTModel

    if not folder.is_dir():
        raise CheckpointError(
            f"--model {folder}: no such folder. Give the folder model.save_pretrained(dir) "
            "wrote (a run's final_model)."
        )
    if not (folder / "config.json").exists():
        hint = (
            " It holds checkpoints: use --checkpoint instead."
            if (folder / "MANIFEST.json").exists() or (folder / "checkpoints").is_dir()
            else ""
        )
        raise CheckpointError(
            f"--model {folder}: not a model folder (no config.json). Give the folder "
            f"model.save_pretrained(dir) wrote (a run's final_model).{hint}"
        )
    model = APTModel.from_pretrained(folder)
    return _Loaded(
        model=model,
        tokenizer=model.tokenizer or "byte",  # the one saved beside the weights
        source={"model": str(folder.resolve()), "step": None},
        json_path=folder / "eval.json",
    )


def _tokenizer(flag: str | None, loaded: Any) -> Any:
    """``--tokenizer`` (a name, or a tokenizer.json / folder path), else the model's own."""
    from apt.trainops.data import Tokenizer, build_tokenizer

    if flag is not None:
        is_path = flag not in ("byte", "bpe", "hf") and Path(flag).expanduser().exists()
        return build_tokenizer({"kind": "hf", "path": flag} if is_path else flag)
    return loaded if isinstance(loaded, Tokenizer) else build_tokenizer(loaded)


def _load_checkpoint(path: Path) -> _Loaded:
    """The plain model of a checkpoint (LoRA adapters merged), rebuilt from its run config.

    Raises:
        CheckpointError: no such folder, no checkpoint in it, one that fails verification, or
            one without a run config.
        ConfigError: its config no longer validates, or its task is not a language model.
    """
    from apt.trainops.engine.tasks import CausalLMTask, build_task
    from apt.trainops.engine.trained_model import load_trained_model

    trained = load_trained_model(path)
    task = trained.config.training.task
    if not isinstance(build_task(task), CausalLMTask):
        raise ConfigError(
            f"{trained.path / 'trainer_state.json'}: the run trained the {task.kind!r} task; "
            "eval scores language models (causal_lm, sft) on text"
        )
    return _Loaded(
        model=trained.model,
        tokenizer=trained.tokenizer,
        source={"checkpoint": str(trained.path.resolve()), "step": trained.step},
        json_path=trained.run_dir / "eval.json",
    )


def _text_dataset(path: Path, tokenizer: Any, seq_len: int) -> tuple[Any, Any]:
    """The text of ``path`` (a file, or the .txt/.jsonl files under a folder) as packed
    sequences of ``seq_len`` tokens, and what was read.

    Raises:
        DataError: no such path, no text file in the folder, no text, or too little for one
            sequence.
    """
    from apt.trainops.data import (
        CorpusFile,
        PackedDataset,
        read_documents,
        resolve_files,
        tokenize_documents,
    )
    from apt.trainops.data.corpus import SUPPORTED_SUFFIXES
    from apt.trainops.data.packing import num_sequences

    if path.is_dir():
        found = sorted(
            str(p)
            for p in path.rglob("*")
            if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file()
        )
        if not found:
            raise DataError(
                f"--data {path}: the folder holds no .txt or .jsonl file. Put the text in "
                ".txt files (UTF-8), or give one text file."
            )
        files = resolve_files(found, key="--data")
    elif path.is_file():
        kind = SUPPORTED_SUFFIXES.get(path.suffix.lower(), "text")  # any other name: text
        files = [CorpusFile(path.resolve(), path.name, kind)]
    else:
        raise DataError(f"--data {path}: no such file or folder. Give a UTF-8 text file or folder.")
    docs = (text for _, text in read_documents(files))
    tokens, stats = tokenize_documents(docs, tokenizer, files=len(files))
    if stats.documents == 0:
        raise DataError(f"--data {path}: holds no text (empty). Give a file with text in it.")
    if num_sequences(len(tokens), seq_len) < 1:
        raise DataError(
            f"--data {path}: {len(tokens)} tokens cannot fill one sequence of {seq_len} "
            f"(needs {seq_len + 1}). Add text, or pass a smaller --seq-len."
        )
    return PackedDataset(tokens, seq_len), stats


def _print_table(report: dict[str, Any]) -> None:
    source = report.get("model") or report.get("checkpoint")
    step = f" (step {report['step']})" if report.get("step") is not None else ""
    print(
        f"{source}{step} on {report['data']}: {report['sequences']} sequences of "
        f"{report['seq_len']} tokens ({report['tokenizer']} tokenizer)"
    )
    metrics = report["metrics"]
    if not metrics:
        print("no target was scored")
        return
    width = max(len("metric"), *(len(name) for name in metrics))
    print(f"{'metric':<{width}}  value")
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.6f}")


def _write_report(out: Path, report: dict[str, Any]) -> int:
    """Write ``report`` to ``out`` (atomically); the exit code."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        print(
            f"error: cannot write {out}: {exc.strerror or exc}. Pass --json OUT with a "
            "writable path.",
            file=sys.stderr,
        )
        return 2
    print(f"metrics written to {out}")
    return 0
