"""The Hugging Face format, both ways: :func:`to_hf` writes a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as ``LlamaForCausalLM``;
:func:`from_hf` reads such a folder (a local one: nothing is ever downloaded) into an
:class:`APTModel`. Neither needs ``transformers``: the files are JSON and safetensors.

    to_hf(model, "exported/")       # config.json, model.safetensors, tokenizer files
    model = from_hf("exported/")    # the same weights, bit for bit

Weights over ``max_shard_size`` (5 GB) are written as shards and their index
(:mod:`apt.model.interop.shards`), which both functions and transformers read.

The tensor names and the config keys are mapped by :mod:`apt.model.interop.llama`, the
tokenizer files by :mod:`apt.model.interop.hf_tokenizer`. What the other side cannot hold is
refused with an :class:`InteropError` naming it: an APT model's MoE layers, align loss and
voter; a checkpoint's RoPE scaling other than llama3's, biases, other activations or other
model types.

Writing is all or nothing: the files go into a staging folder beside the target
(``.<name>.tmp-<pid>``), which then becomes the target (a new or empty one) or has its files
moved into it; files of the target that an export does not write are kept, except the ones an
earlier export wrote (tokenizer files of a model that now has none).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from apt.core.config.model import ModelConfig
from apt.core.files import apply_umask
from apt.model.architectures.apt_model import APTModel
from apt.model.architectures.pretrained import CONFIG_MAX_BYTES, MAX_ROPE_ENTRIES
from apt.model.interop.errors import InteropError
from apt.model.interop.hf_tokenizer import TOKENIZER_FILES, read_tokenizer, special_ids
from apt.model.interop.hf_tokenizer import write_tokenizer as _write_tokenizer
from apt.model.interop.llama import DERIVED_TENSORS, apt_config, hf_config, hf_names, hf_shapes
from apt.model.interop.shards import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_FILE,
    WEIGHTS_FILE,
    is_weights_file,
    parse_size,
    plan_shards,
    write_weights,
)

__all__ = ["CONFIG_FILE", "INDEX_FILE", "WEIGHTS_FILE", "from_hf", "to_hf"]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def _exported(name: str) -> bool:
    """Whether :func:`to_hf` may write a file of this name (a re-export removes the ones it no
    longer writes)."""
    return name in (CONFIG_FILE, *TOKENIZER_FILES) or is_weights_file(name)


# ---------------------------------------------------------------------------- APT -> HF


def _check_exportable(model: APTModel) -> None:
    """Refuse a model with a module ``LlamaForCausalLM`` has no place for."""
    cfg = model.config
    if cfg.moe is not None:
        layers = list(model.moe_layers())
        raise InteropError(
            f"model.moe: {len(layers)} block(s) ({', '.join(layers[:4])}) hold mixture-of-experts "
            f"feed-forward layers (a router and {cfg.moe.num_experts} experts); LlamaForCausalLM "
            "has one dense MLP per block, so the model cannot be exported. Export a dense model "
            "(model.moe unset)."
        )
    if cfg.align is not None:
        raise InteropError(
            "model.align: the model carries the align loss and its frozen reference copy, a "
            "training-time module the Hugging Face format has no place for. Load the weights "
            "into a model built without model.align and export that (docs/interop.md shows how)."
        )
    if cfg.voter is not None:
        raise InteropError(
            "model.voter: the voter changes how tokens are chosen (a vote among samples at "
            "uncertain positions), which transformers' generate does not do: the exported model "
            "would decode differently. Load the weights into a model built without model.voter "
            "and export that (docs/interop.md shows how)."
        )


def to_hf(
    model: APTModel,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face Llama folder and return its path.

    The folder holds ``config.json`` (``LlamaForCausalLM``), ``model.safetensors`` (or, past
    ``max_shard_size``, shards ``model-00001-of-0000N.safetensors`` and
    ``model.safetensors.index.json``) and, when ``model.tokenizer`` is set,
    ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` (for the
    byte tokenizer too: see :mod:`apt.model.interop.hf_tokenizer`), plus APT's
    ``apt_tokenizer.json``.

    Args:
        model: the model (a ``torch.compile`` wrapper is unwrapped).
        output: the folder; created, or its files replaced.
        dtype: the dtype of the written weights (``torch.bfloat16`` halves the folder); None:
            the model's own.
        max_shard_size: the largest weights file, in bytes or as ``"500MB"``, ``"2GB"``,
            ``"1.5GiB"``; None: 5 GB.

    Returns:
        ``output``.

    Raises:
        InteropError: the model has MoE layers, the align loss or the voter; ``dtype`` is not
            a floating-point dtype; ``max_shard_size`` is not a size; or writing failed
            (``output`` is then as it was).
    """
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, APTModel):
        raise TypeError(f"to_hf takes an APTModel, got {type(model).__name__}")
    _check_exportable(model)
    dtype = model.embed_tokens.weight.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise InteropError(f"to_hf: dtype must be a floating-point dtype, got {dtype}")
    max_bytes = parse_size(DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    tokenizer = model.tokenizer
    eos_id, pad_id = special_ids(tokenizer)
    vocab = model.config.vocab_size
    assert vocab != "auto"  # a built model has a size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise InteropError(
            f"model.tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} ids, more than the "
            f"model's vocab_size ({vocab}): transformers would index past the "
            "embedding. Set the tokenizer the model was trained with."
        )
    config = hf_config(model.config, dtype=dtype, eos_id=eos_id, pad_id=pad_id)
    state = model.state_dict()
    apt_names = {hf: apt for apt, hf in hf_names(model.config).items()}
    files = plan_shards(
        {hf: state[apt].numel() * dtype.itemsize for hf, apt in apt_names.items()}, max_bytes
    )

    def tensor(hf: str) -> torch.Tensor:
        # On the CPU in `dtype`, each its own copy (safetensors refuses tensors sharing memory).
        return state[apt_names[hf]].detach().to("cpu", dtype, copy=True).contiguous()

    def write(folder: Path) -> None:
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_weights(folder, files, tensor)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, folder, max_length=model.config.max_seq_len)

    target = Path(output).expanduser()
    _write_folder(target, write)
    if tokenizer is None:
        log.warning(
            "%s: the model has no tokenizer, so the folder holds no tokenizer files and "
            "AutoTokenizer cannot load it; set model.tokenizer to export one",
            target,
        )
    shards = f", {len(files)} shards" if len(files) > 1 else ""
    log.info(
        "exported %s (%d tensors, %s%s) as LlamaForCausalLM", target, len(apt_names), dtype, shards
    )
    return target


def _write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a staging folder beside ``target``, then put its files in place.

    Raises:
        InteropError: ``target`` is a file, or a write failed (``target`` is as it was).
    """
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder", str(target))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        written = sorted(staging.iterdir())
        for item in written:
            apply_umask(item)
        if not target.exists() or not any(target.iterdir()):
            os.replace(staging, target)  # a new (or empty) folder: one rename
            return
        for item in written:
            os.replace(item, target / item.name)
        names = {item.name for item in written}
        for stale in target.iterdir():
            if _exported(stale.name) and stale.name not in names and not stale.is_dir():
                stale.unlink()
        staging.rmdir()
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(exc, OSError | SafetensorError):
            raise
        text = (
            f"{exc.strerror or exc} ({exc.filename or target})" if isinstance(exc, OSError) else exc
        )
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = " Free space, or export to a larger disk." if full else ""
        raise InteropError(
            f"could not export the model to {target}: {text}. {target} was left as it was.{hint}"
        ) from None


# ---------------------------------------------------------------------------- HF -> APT


def _read_json(path: Path, what: str) -> Any:
    try:
        if path.stat().st_size > CONFIG_MAX_BYTES:
            raise InteropError(f"{path} is over {CONFIG_MAX_BYTES} bytes; it is not a {what}")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InteropError(
            f"{path} not found: a Hugging Face model folder holds {CONFIG_FILE} and its weights "
            f"({WEIGHTS_FILE}, or shards listed in {INDEX_FILE}). Download the whole folder."
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise InteropError(f"{path} is not a valid {what} ({exc}); download it again") from None


#: Where one stored tensor is: its file and its shape.
_Stored = tuple[Path, tuple[int, ...]]


def _stored_tensors(folder: Path) -> dict[str, _Stored]:
    """Tensor name -> (safetensors file, shape), from the headers of ``model.safetensors`` or
    of the shards of an index (no tensor is loaded).

    Raises:
        InteropError: no safetensors weights (only PyTorch pickles), a shard missing, or a
            file that is not safetensors.
    """
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if single.is_file():  # transformers prefers it to an index too
        return {name: (single, shape) for name, shape in _header(single).items()}
    if not index.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        found = f" (it holds {', '.join(pickles[:3])}: PyTorch pickles)" if pickles else ""
        raise InteropError(
            f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}{found}. APT reads "
            "safetensors only and never unpickles: convert the checkpoint with transformers "
            "(model.save_pretrained(dir), which writes safetensors) or download its safetensors."
        )
    weight_map = _read_json(index, "safetensors index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InteropError(f"{index} has no weight_map; download it again")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise InteropError(f"{index}: {name} is in {shard!r}, not a file of {folder}")
        shards.setdefault(shard, []).append(name)
    stored: dict[str, _Stored] = {}
    for shard, names in sorted(shards.items()):
        path = folder / shard
        if not path.is_file():
            raise InteropError(
                f"{path} not found: {index} lists it. The download is incomplete; fetch it."
            )
        header = _header(path)
        absent = [n for n in names if n not in header]
        if absent:
            raise InteropError(f"{path} lacks {', '.join(absent[:3])}, which {index} lists there")
        stored.update((n, (path, header[n])) for n in names)
    return stored


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from a safetensors header."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InteropError(
            f"{path} is not a valid safetensors file ({exc}); download it again"
        ) from None


def _check_tensors(
    stored: dict[str, _Stored], expected: dict[str, tuple[int, ...]], folder: Path
) -> None:
    """Refuse, before anything is allocated, tensors missing, extra or of the wrong shape."""
    shapes = {n: shape for n, (_, shape) in stored.items() if not n.endswith(DERIVED_TENSORS)}
    if "lm_head.weight" in shapes and "lm_head.weight" not in expected:
        # transformers ties the head to the embedding and ignores a stored copy too.
        log.warning("%s: lm_head.weight is ignored: tie_word_embeddings is true", folder)
        del shapes["lm_head.weight"]
    missing = [n for n in expected if n not in shapes]
    extra = [n for n in shapes if n not in expected]
    wrong = [f"{n} {shapes[n]} (config: {s})" for n, s in expected.items() if shapes.get(n, s) != s]
    problems = [
        f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
        if items
    ]
    if problems:
        why = " It has biases; APT's layers have none." if any(".bias" in n for n in extra) else ""
        raise InteropError(
            f"{folder}: its tensors are not the Llama model its {CONFIG_FILE} describes "
            f"({'; '.join(problems)}).{why} Nothing was loaded."
        )


def _build(cfg: ModelConfig, dtype: torch.dtype) -> APTModel:
    """The model of ``cfg`` in ``dtype`` with uninitialised weights (every one is loaded next):
    built on the meta device, so no time goes into a random init."""
    with torch.device("meta"):
        model = APTModel(cfg)
    model = model.to_empty(device="cpu").to(dtype)  # RoPE tables are rebuilt, not left empty
    if cfg.tie_embeddings:  # to_empty gives each module a new parameter: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def _load_tensors(model: APTModel, stored: dict[str, _Stored]) -> None:
    """Copy every parameter from the file that stores it, one tensor at a time."""
    params = dict(model.named_parameters())  # a tied head shares the embedding: not listed
    names = {apt: hf for apt, hf in hf_names(model.config).items() if apt in params}
    assert names.keys() == params.keys(), sorted(set(params) ^ set(names))
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for apt_name, hf_name in names.items():
        by_file.setdefault(stored[hf_name][0], []).append((apt_name, hf_name))
    with torch.no_grad():
        for path, pairs in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for apt_name, hf_name in pairs:
                        params[apt_name].copy_(fh.get_tensor(hf_name))
            except (SafetensorError, OSError, RuntimeError) as exc:
                raise InteropError(
                    f"{path} is corrupt or truncated ({exc}); download it again"
                ) from None


def from_hf(path: str | Path, *, dtype: torch.dtype | None = None) -> APTModel:
    """Import a local Hugging Face Llama-shaped checkpoint folder as an :class:`APTModel`.

    Reads ``config.json`` (``model_type`` llama, or mistral without a sliding window) and the
    safetensors weights (``model.safetensors``, or the shards of
    ``model.safetensors.index.json``); brings the tokenizer along when the folder has a
    ``tokenizer.json``. Nothing is downloaded.

    Args:
        path: the folder (e.g. from ``hf download ORG/NAME --local-dir DIR``).
        dtype: the parameters' dtype; None: float32 (what APT trains; bf16 and fp16 weights
            widen exactly).

    Returns:
        The model, in train mode like any freshly built one, with ``model.tokenizer`` set
        when the folder has one.

    Raises:
        InteropError: the folder does not exist; its config describes another network
            (another model_type, RoPE scaling other than llama3, biases, an activation other
            than silu, head_dim != hidden_size / num_attention_heads, a sliding window,
            quantized weights); tensors are missing, extra or of the wrong shape; a file is
            unreadable.
        ConfigError: the tokenizer files are there but do not make a tokenizer.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise InteropError(
            f"{folder} not found. from_hf reads a local folder and never downloads: download "
            f"the checkpoint first (hf download ORG/NAME --local-dir {folder}) and pass the folder"
        )
    if not folder.is_dir():
        raise InteropError(f"{folder} is a file; pass the folder that holds {CONFIG_FILE}")
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise InteropError(f"from_hf: dtype must be a floating-point dtype, got {dtype}")
    hf = _read_json(folder / CONFIG_FILE, "model config")
    if not isinstance(hf, dict):
        raise InteropError(f"{folder / CONFIG_FILE} is not a JSON object; download it again")
    cfg = apt_config(hf, folder / CONFIG_FILE)
    head = cfg.hidden_size // cfg.num_heads
    if cfg.max_seq_len * head > MAX_ROPE_ENTRIES:
        raise InteropError(
            f"{folder / CONFIG_FILE}: max_position_embeddings {cfg.max_seq_len} x head size "
            f"{head} makes RoPE tables over {MAX_ROPE_ENTRIES:,} entries. Nothing was loaded."
        )
    stored = _stored_tensors(folder)
    _check_tensors(stored, hf_shapes(cfg), folder)
    model = _build(cfg, dtype)
    _load_tensors(model, stored)
    model.tokenizer = read_tokenizer(folder)
    return model
