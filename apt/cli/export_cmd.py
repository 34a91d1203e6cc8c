"""``export``: write a trained model in the Hugging Face format (or again in APT's own), or
keep it by name in the local model store.

    python -m apt export runs/tiny --format hf --output tiny-hf        # a run's final_model
    python -m apt export runs/tiny/final_model --output tiny-hf        # a model folder
    python -m apt export llama-folder --format apt --output llama-apt  # a Hugging Face folder in
    python -m apt export runs/tiny --name tiny-code [--force]          # into the model store

The source is a run folder (its ``final_model/``; without one, its newest checkpoint that
verifies), a checkpoint step folder or checkpoints folder, a folder ``save_pretrained`` wrote,
or a local Hugging Face Llama folder (its ``config.json`` has a ``model_type``; imported with
:func:`apt.model.interop.from_hf`). ``--format hf`` writes what ``transformers`` loads as
``LlamaForCausalLM`` (:func:`apt.model.interop.to_hf`); ``--format apt`` writes
``save_pretrained``'s folder. ``--name`` writes the APT format into the local model store
(:class:`apt.model.store.ModelStore`: ``--store``, else ``$APT_HOME``, else
``~/.cache/apt/models``) with a model card made from what the run folder holds; ``--force``
replaces a model of that name. A source or a model that cannot be exported ends the command
with exit code 2 and one line naming the path and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apt.core.errors import CheckpointError, ConfigError

__all__ = ["EXPORT_FORMATS", "add_export_parser", "cmd_export"]

log = logging.getLogger("apt")

#: The names ``--format`` takes.
EXPORT_FORMATS = ("hf", "apt")
#: The names ``--dtype`` takes (torch dtype names).
_DTYPES = ("float32", "bfloat16", "float16")


def add_export_parser(sub: Any) -> None:
    """Register ``export`` and its flags on the CLI's subparsers."""
    ex = sub.add_parser(
        "export",
        help="write a run's final model (or a model folder) in the Hugging Face format, or "
        "into the local model store by name",
    )
    ex.add_argument(
        "source",
        metavar="RUN_DIR|MODEL_DIR",
        help="a run folder (its final_model/, else its newest checkpoint), a checkpoint folder, "
        "a folder save_pretrained wrote, or a local Hugging Face Llama folder",
    )
    target = ex.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", "-o", metavar="DIR", help="the folder to write")
    target.add_argument(
        "--name",
        metavar="NAME",
        help="store the model (APT format, with a model card) in the local model store as "
        "NAME; load it with APTModel.from_pretrained(NAME)",
    )
    ex.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        help="hf: a folder transformers loads as LlamaForCausalLM (default with --output); "
        "apt: save_pretrained's config.json + model.safetensors (the only one with --name)",
    )
    ex.add_argument(
        "--dtype",
        choices=_DTYPES,
        help="dtype of the written weights (default: the source's; float32 for a Hugging "
        "Face source)",
    )
    ex.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="with --format hf: weights over SIZE (like 500MB, 2GB; default 5GB) are written "
        "as model-0000K-of-0000N.safetensors shards and model.safetensors.index.json",
    )
    ex.add_argument(
        "--force", action="store_true", help="with --name: replace a stored model of that name"
    )
    ex.add_argument(
        "--store",
        metavar="DIR",
        help="with --name: the model store's folder (default: $APT_HOME, else ~/.cache/apt/models)",
    )


@dataclass
class _Source:
    """What ``export`` reads: a model folder, or a checkpoint (its weights and run config)."""

    path: Path  # the model folder, or the checkpoint's step folder
    run: Path | None  # the run folder it belongs to, when there is one
    checkpoint: bool


def _source(source: Path) -> _Source:
    """What ``source`` names: a model folder, a run's ``final_model/``, or a checkpoint.

    Raises:
        ConfigError: no such folder, or none of a model folder, a run folder holding a model or
            a checkpoint, or a checkpoint folder.
    """
    from apt.trainops.artifacts.export import is_run_folder
    from apt.trainops.checkpoints.layout import MANIFEST_FILE, committed_dirs

    if not source.is_dir():
        raise ConfigError(
            f"export {source}: no such folder. Give a run folder (artifacts.output_dir/"
            "<experiment>) or a model folder (its final_model)."
        )
    if (source / "config.json").is_file():
        parent = source.absolute().parent
        return _Source(source, parent if is_run_folder(parent) else None, checkpoint=False)
    if (source / "final_model" / "config.json").is_file():
        return _Source(source / "final_model", source, checkpoint=False)
    if (source / MANIFEST_FILE).is_file() or committed_dirs(source):
        return _Source(source, None, checkpoint=True)  # a step folder, a checkpoints folder
    if committed_dirs(source / "checkpoints"):
        return _Source(source / "checkpoints", source, checkpoint=True)
    raise ConfigError(
        f"export {source}: not a model folder (no config.json) nor a run folder (no "
        "final_model/config.json, no checkpoint in checkpoints/). Give the folder of a run "
        "that saved a checkpoint or finished, or a folder model.save_pretrained(dir) wrote."
    )


def _is_hf_folder(folder: Path) -> bool:
    """True when ``config.json`` is a Hugging Face one (it has a ``model_type``; APT's has not)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # from_pretrained names what is wrong with it
    return isinstance(config, dict) and "model_type" in config


def _load(source: _Source) -> tuple[Any, Any, _Source]:
    """The APT model of ``source``, what its run tells the model card (None: nothing), and
    what was read (for a checkpoints folder: the step folder chosen).

    Raises:
        CheckpointError: the folder's files, or the checkpoint, cannot be loaded.
    """
    from apt.model import APTModel
    from apt.model.interop import from_hf
    from apt.trainops.artifacts.export import describe_run

    if not source.checkpoint:
        if _is_hf_folder(source.path):
            return from_hf(source.path), None, source
        model = APTModel.from_pretrained(source.path)
        return model, describe_run(source.run) if source.run is not None else None, source
    from apt.cli.eval_cmd import _load_checkpoint  # one reader of checkpoints for both commands
    from apt.trainops.data import Tokenizer, build_tokenizer

    loaded = _load_checkpoint(source.path)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer)
    ckpt = Path(loaded.source["checkpoint"])
    step = loaded.source["step"]
    log.info("no final_model: exporting the newest checkpoint, %s (step %d)", ckpt, step)
    run = ckpt.parent.parent
    read = _Source(ckpt, run, checkpoint=True)
    return model, describe_run(run, step=step, checkpoint=ckpt), read


def _check_flags(args: argparse.Namespace) -> str:
    """The format to write, once the flags agree with each other.

    Raises:
        ConfigError: ``--format hf`` with ``--name``, or ``--force`` / ``--store`` without it.
    """
    if args.name is None:
        for flag in ("force", "store"):
            if getattr(args, flag):
                raise ConfigError(f"export: --{flag} goes with --name (the model store)")
        return str(args.format or "hf")
    if args.format == "hf":
        raise ConfigError(
            f"export --name {args.name}: the model store holds APT models; drop --format hf "
            "(or write a Hugging Face folder with --output DIR)"
        )
    from apt.model.store import check_model_name

    check_model_name(args.name)  # before loading anything
    return "apt"


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``export``; the exit code (errors are raised: the CLI maps them to exit code 2)."""
    fmt = _check_flags(args)
    if args.max_shard_size is not None:
        if fmt != "hf":
            raise ConfigError("export: --max-shard-size goes with --format hf (--output DIR)")
        from apt.model.interop.shards import parse_size

        parse_size(args.max_shard_size)  # a bad size fails before anything is loaded
    source = _source(Path(args.source).expanduser())
    output = Path(args.output).expanduser() if args.output is not None else None
    if output is not None and output.resolve() == source.path.resolve():
        raise ConfigError(
            f"export: --output {output} is the source folder; write the export somewhere else"
        )
    import torch

    from apt.trainops.artifacts.errors import ExportError

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model, training, source = _load(source)
        if dtype is not None and fmt == "apt":
            model = model.to(dtype)
        if output is None:
            where = _store(args, model, source, training)
        elif fmt == "hf":
            from apt.model.interop import to_hf

            to_hf(model, output, dtype=dtype, max_shard_size=args.max_shard_size)
            where = f"{output} as LlamaForCausalLM (Hugging Face)"
        else:
            from apt.trainops.artifacts.export import write_model

            write_model(model, output)
            where = f"{output} as APT save_pretrained"
    except (CheckpointError, ExportError) as exc:  # APTErrors of exit code 1 elsewhere
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {source.path} -> {where}, {model.num_parameters():,} parameters")
    return 0


def _store(args: argparse.Namespace, model: Any, source: _Source, training: Any) -> str:
    """Save ``model`` into the store ``--store`` names as ``--name``; where it went, in words."""
    from apt.model.store import ModelStore

    store = ModelStore.of(Path(args.store).expanduser() if args.store else None)
    path = store.save(
        args.name,
        model,
        overwrite=args.force,
        source=source.path.absolute(),
        training=training,
    )
    steps = f" (step {training.steps})" if training is not None and training.steps else ""
    return f"{args.name!r}{steps} in the local model store ({path})"
