"""``export``: write a trained model in the Hugging Face format (or again in APT's own).

    python -m apt export runs/tiny --format hf --output tiny-hf        # a run's final_model
    python -m apt export runs/tiny/final_model --output tiny-hf        # a model folder
    python -m apt export llama-folder --format apt --output llama-apt  # a Hugging Face folder in

The source is a run folder (its ``final_model/``), a folder ``save_pretrained`` wrote, or a
local Hugging Face Llama folder (its ``config.json`` has a ``model_type``; imported with
:func:`apt.model.interop.from_hf`). ``--format hf`` writes what ``transformers`` loads as
``LlamaForCausalLM`` (:func:`apt.model.interop.to_hf`); ``--format apt`` writes
``save_pretrained``'s folder. A source or a model that cannot be exported ends the command with
exit code 2 and one line naming the path and the fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
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
        "export", help="write a run's final model (or a model folder) in the Hugging Face format"
    )
    ex.add_argument(
        "source",
        metavar="RUN_DIR|MODEL_DIR",
        help="a run folder (its final_model/ is exported), a folder save_pretrained wrote, "
        "or a local Hugging Face Llama folder",
    )
    ex.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write")
    ex.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="hf",
        help="hf: a folder transformers loads as LlamaForCausalLM (default); apt: "
        "save_pretrained's config.json + model.safetensors",
    )
    ex.add_argument(
        "--dtype",
        choices=_DTYPES,
        help="dtype of the written weights (default: the source's; float32 for a Hugging "
        "Face source)",
    )


def _model_folder(source: Path) -> Path:
    """The model folder ``source`` names: itself, or a run folder's ``final_model/``.

    Raises:
        ConfigError: no such folder, or neither a model folder nor a run folder holding one.
    """
    if not source.is_dir():
        raise ConfigError(
            f"export {source}: no such folder. Give a run folder (artifacts.output_dir/"
            "<experiment>) or a model folder (its final_model)."
        )
    if (source / "config.json").is_file():
        return source
    final = source / "final_model"
    if (final / "config.json").is_file():
        return final
    hint = (
        " The run has checkpoints but no final_model yet: let it finish (or set "
        "artifacts.save_final_model: true)."
        if (source / "checkpoints").is_dir()
        else ""
    )
    raise ConfigError(
        f"export {source}: not a model folder (no config.json) nor a run folder (no "
        f"final_model/config.json).{hint}"
    )


def _is_hf_folder(folder: Path) -> bool:
    """True when ``config.json`` is a Hugging Face one (it has a ``model_type``; APT's has not)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # from_pretrained names what is wrong with it
    return isinstance(config, dict) and "model_type" in config


def _load(folder: Path) -> Any:
    """The APT model of ``folder`` (a ``save_pretrained`` folder, or a Hugging Face one)."""
    from apt.model import APTModel
    from apt.model.interop import from_hf

    if _is_hf_folder(folder):
        return from_hf(folder)
    return APTModel.from_pretrained(folder)


def cmd_export(args: argparse.Namespace) -> int:
    """Run ``export``; the exit code (errors are raised: the CLI maps them to exit code 2)."""
    source, output = Path(args.source).expanduser(), Path(args.output).expanduser()
    folder = _model_folder(source)
    if output.resolve() == folder.resolve():
        raise ConfigError(
            f"export: --output {output} is the source folder; write the export somewhere else"
        )
    import torch

    from apt.trainops.artifacts.errors import ExportError

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = _load(folder)
        if args.format == "hf":
            from apt.model.interop import to_hf

            to_hf(model, output, dtype=dtype)
        else:
            from apt.trainops.artifacts.export import write_model

            write_model(model.to(dtype) if dtype is not None else model, output)
    except (CheckpointError, ExportError) as exc:  # APTErrors of exit code 1 elsewhere
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = "LlamaForCausalLM (Hugging Face)" if args.format == "hf" else "APT save_pretrained"
    print(f"exported {folder} -> {output} as {what}, {model.num_parameters():,} parameters")
    return 0
