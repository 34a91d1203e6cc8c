"""The tokenizer files of a Hugging Face model folder, written from and read into APT tokenizers.

``transformers.AutoTokenizer`` reads ``tokenizer.json`` (the ``tokenizers`` library's file) with
``tokenizer_config.json`` (which class, which tokens are end of text and padding, the longest
input) and ``special_tokens_map.json``. APT adds its own ``apt_tokenizer.json`` beside them, so
:func:`read_tokenizer` gives back the very tokenizer that was exported (transformers ignores it).

:class:`~apt.model.tokenizers.ByteTokenizer` has no ``tokenizer.json`` of its own; the one
:func:`byte_tokenizer_spec` builds encodes every text to the same ids (each UTF-8 byte is its
own id): a BPE without merges whose vocabulary is NUL (id 0, the end-of-text token, also written
as an added special token so transformers never splits it) and ``<0x01>`` .. ``<0xFF>``, with
``byte_fallback``: no character but NUL is in the vocabulary, so each falls back to the tokens
of its UTF-8 bytes (the scheme of Llama 2's tokenizer). There is no normalizer, no
pre-tokenizer and no post-processor, so nothing is changed, split off or added.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from apt.model.interop.errors import InteropError
from apt.model.tokenizers import (
    PAD,
    TOKENIZER_FILE,
    TOKENIZER_META,
    ByteTokenizer,
    JSONTokenizer,
    Tokenizer,
    load_tokenizer,
    save_tokenizer,
)

__all__ = [
    "SPECIAL_TOKENS_MAP",
    "TOKENIZER_CONFIG",
    "TOKENIZER_FILES",
    "byte_tokenizer_spec",
    "read_tokenizer",
    "special_ids",
    "write_tokenizer",
]

TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
#: Every file :func:`write_tokenizer` may write.
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER_META)
#: The byte tokenizer's end-of-text token: byte 0 itself.
_NUL = "\x00"


def byte_tokenizer_spec() -> dict[str, Any]:
    """A ``tokenizer.json`` (as a dict) that encodes exactly as :class:`ByteTokenizer`."""
    vocab = {_NUL: 0, **{f"<0x{b:02X}>": b for b in range(1, 256)}}
    nul = {
        "id": 0,
        "content": _NUL,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [nul],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _token_id(spec: dict[str, Any], token: str) -> int | None:
    """The id of ``token`` in a ``tokenizer.json``: an added token, else a vocabulary entry."""
    for added in spec.get("added_tokens") or []:
        if added.get("content") == token:
            return int(added["id"])
    vocab = (spec.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and token in vocab:
        return int(vocab[token])
    return None


def _tokens(tokenizer: Tokenizer) -> tuple[str, str | None]:
    """The end-of-text and padding tokens (padding: ``<|pad|>`` when the vocabulary has it)."""
    if isinstance(tokenizer, JSONTokenizer):
        spec = json.loads(tokenizer.serialized())
        return tokenizer.eos_token, PAD if _token_id(spec, PAD) is not None else None
    return _NUL, None


def special_ids(tokenizer: Tokenizer | None) -> tuple[int | None, int | None]:
    """The end-of-text and padding ids of ``tokenizer`` (None where it has none).

    Raises:
        InteropError: a tokenizer other than :class:`ByteTokenizer` and :class:`JSONTokenizer`.
    """
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.eos_id, None
    if not isinstance(tokenizer, JSONTokenizer):
        raise InteropError(
            f"model.tokenizer is a {type(tokenizer).__name__}; the Hugging Face format holds "
            "byte, bpe and hf tokenizers. Set model.tokenizer = None to export the weights alone."
        )
    spec = json.loads(tokenizer.serialized())
    return tokenizer.eos_id, _token_id(spec, PAD)


def write_tokenizer(tokenizer: Tokenizer, folder: Path, *, max_length: int) -> None:
    """Write the files ``AutoTokenizer.from_pretrained(folder)`` loads ``tokenizer`` from.

    Args:
        tokenizer: a :class:`ByteTokenizer` or a :class:`JSONTokenizer`.
        folder: an existing folder.
        max_length: ``model_max_length``, the longest input (the model's ``max_seq_len``).
    """
    special_ids(tokenizer)  # refuses another kind of tokenizer
    save_tokenizer(tokenizer, folder)  # apt_tokenizer.json, and a JSON tokenizer's file
    if isinstance(tokenizer, ByteTokenizer):
        text = json.dumps(byte_tokenizer_spec(), ensure_ascii=True)
        (folder / TOKENIZER_FILE).write_text(text + "\n", encoding="utf-8")
    eos, pad = _tokens(tokenizer)
    special: dict[str, str] = {"eos_token": eos, **({"pad_token": pad} if pad else {})}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_length,
        # Decoding gives back the text as APT decodes it: no spaces removed before punctuation.
        "clean_up_tokenization_spaces": False,
    }
    for name, content in ((TOKENIZER_CONFIG, config), (SPECIAL_TOKENS_MAP, special)):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _configured_eos(folder: Path) -> str | None:
    """``eos_token`` of ``tokenizer_config.json`` (a string, or an AddedToken's ``content``)."""
    path = folder / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path} cannot be read ({exc}); restore it or remove it") from None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def read_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer of a Hugging Face model folder; None when it has no ``tokenizer.json``.

    A folder :func:`write_tokenizer` wrote gives back the APT tokenizer it was written from
    (``apt_tokenizer.json``); any other gives an ``hf`` :class:`JSONTokenizer` whose end of text
    is ``tokenizer_config.json``'s ``eos_token`` (when it names one).

    Raises:
        ConfigError: the files are there but do not make a tokenizer.
    """
    if (folder / TOKENIZER_META).is_file():
        return load_tokenizer(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    eos = _configured_eos(folder)
    return JSONTokenizer(folder, kind="hf", eos_token=eos, key=str(folder / TOKENIZER_FILE))
