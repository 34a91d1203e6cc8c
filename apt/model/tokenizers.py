"""Tokenizers: text <-> ids. They live beside the model because they travel with it: a saved
model folder holds its tokenizer, ``from_pretrained`` brings it back and ``generate`` takes text.

* :class:`ByteTokenizer`: UTF-8 bytes, 256 ids, nothing to train or download (the default).
* :class:`JSONTokenizer`: a ``tokenizer.json`` of the ``tokenizers`` library (extra ``hf``):
  the byte-level BPE that ``python -m apt data tokenizer`` trains (``kind: bpe``), or any
  Hugging Face tokenizer file or folder the user already has (``kind: hf``).

A folder written by :func:`save_tokenizer` holds ``apt_tokenizer.json`` (kind, size, end-of-text
id) and, for a JSON tokenizer, ``tokenizer.json`` (which ``transformers`` reads as well).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from apt.core.errors import ConfigError

__all__ = [
    "END_OF_TEXT",
    "PAD",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "TOKENIZER_META",
    "ByteTokenizer",
    "JSONTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "save_tokenizer",
    "token_dtype",
]

#: The end-of-text token, appended after every document when documents are packed together.
END_OF_TEXT = "<|endoftext|>"
#: The padding token.
PAD = "<|pad|>"
#: Special tokens of a trained BPE tokenizer, in id order (ids 0..5): end of text, padding and
#: the chat markers of a conversation turn (system / user / assistant header, end of turn).
SPECIAL_TOKENS = (END_OF_TEXT, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
#: Names an existing tokenizer may give its end-of-text token, tried in order.
_EOS_NAMES = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META = "apt_tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and ``generate`` need from a tokenizer.

    Attributes:
        name: the ``data.tokenizer`` kind (``byte``, ``bpe``, ``hf``).
        vocab_size: number of distinct ids; ids are ``0 .. vocab_size - 1``.
        eos_id: the id appended after every document when documents are packed together.
    """

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        ...

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array of :func:`token_dtype` ``(vocab_size)``."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ids that cannot be decoded become U+FFFD, never an exception."""
        ...


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every id of a ``vocab_size`` vocabulary."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _as_int_array(ids: Iterable[int]) -> np.ndarray:
    values = np.asarray(ids if hasattr(ids, "__array__") else list(ids), dtype=np.int64)
    return values.reshape(-1)


def _decode_runs(values: np.ndarray, vocab_size: int, decode_run: Any) -> str:
    """Decode each run of in-range ids with ``decode_run``; an out-of-range id (a model with a
    larger vocabulary than its tokenizer can sample one) becomes U+FFFD and never glues the ids
    around it into a character they do not form."""
    valid = (values >= 0) & (values < vocab_size)
    if valid.all():
        return str(decode_run(values.tolist()))
    parts: list[str] = []
    run: list[int] = []
    for value, ok in zip(values.tolist(), valid.tolist(), strict=True):
        if ok:
            run.append(value)
            continue
        parts += [decode_run(run) if run else "", "\ufffd"]
        run = []
    parts.append(decode_run(run) if run else "")
    return "".join(parts)


class ByteTokenizer:
    """UTF-8 byte-level tokenizer: one id per byte, 256 ids, no special tokens.

    ``eos_id`` is byte 0 (NUL), which does not occur in ordinary text; packing appends it after
    every document so the model sees where one file ends and the next begins.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([104, 195, 169])
    'hé'
    """

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as a list of ints in ``0..255``."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as a ``uint8`` array (no copy of the bytes object)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids back to text; invalid UTF-8 and ids outside ``0..255`` become U+FFFD."""
        values = _as_int_array(ids)
        return _decode_runs(values, 256, lambda run: bytes(run).decode("utf-8", errors="replace"))

    def token_bytes(self, token_id: int) -> bytes:
        """The byte ``token_id`` stands for."""
        return bytes([token_id])

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """The printable character that byte-level BPE writes for each byte -> that byte.

    Bytes that print as themselves (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) keep their code
    point; the other 68 take the code points from 256 up, in byte order.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _tokenizers_library() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(
            "data.tokenizer: bpe and hf tokenizers need the tokenizers library; install it "
            "with: pip install 'apt-transformer[hf]'"
        ) from None
    return tokenizers


def _tokenizer_file(path: str | os.PathLike[str], *, key: str) -> Path:
    """``path`` (a ``tokenizer.json`` or a folder holding one) -> the file."""
    given = Path(path).expanduser()
    file = given / TOKENIZER_FILE if given.is_dir() else given
    if not file.is_file():
        where = f"{given} holds no {TOKENIZER_FILE}" if given.is_dir() else f"{given} not found"
        raise ConfigError(
            f"{key}: {where}. Point it at a tokenizer.json or a folder holding one (train one "
            "with `python -m apt data tokenizer --input FILES --vocab-size N --output DIR`)."
        )
    return file


class JSONTokenizer:
    """A tokenizer of the ``tokenizers`` library, read from its ``tokenizer.json``.

    Text is encoded without the special tokens a post-processor would add (a BERT file's
    ``[CLS]``); packing adds the end-of-text id itself.

    Args:
        path: a ``tokenizer.json``, or a folder holding one (a Hugging Face tokenizer folder).
        kind: ``bpe`` (trained by APT) or ``hf`` (any other file); the name in configs.
        eos_token: the end-of-text token; None: the first of ``<|endoftext|>``, ``</s>``,
            ``<|end_of_text|>``, ``<eos>``, ``<|im_end|>``, ``[SEP]`` the vocabulary has.
        key: the config key named in errors.

    Raises:
        ConfigError: no such file, not a tokenizer file, or no end-of-text token.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str = "hf",
        eos_token: str | None = None,
        key: str = "data.tokenizer.path",
    ) -> None:
        library = _tokenizers_library()
        self.path = _tokenizer_file(path, key=key)
        self.name = kind
        try:
            self._tok = library.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a bare Exception for any parse error
            raise ConfigError(
                f"{key}: {self.path} is not a tokenizers tokenizer.json ({exc}). Use the "
                "tokenizer.json of a tokenizers / Hugging Face tokenizer."
            ) from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_token = self._eos_token(eos_token, key=key)
        self.eos_id = int(self._tok.token_to_id(self.eos_token))
        spec = json.loads(self._tok.to_str())
        self._special = {int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
        self._byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"

    def _eos_token(self, wanted: str | None, *, key: str) -> str:
        names = (wanted,) if wanted is not None else _EOS_NAMES
        for name in names:
            if self._tok.token_to_id(name) is not None:
                return name
        tried = ", ".join(names)
        raise ConfigError(
            f"{key}: {self.path} has no end-of-text token ({tried} not in its vocabulary). Name "
            "the one it has: data.tokenizer: {kind: hf, path: ..., eos_token: '<its token>'}."
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a :func:`token_dtype` array."""
        return np.asarray(self.encode(text), dtype=token_dtype(self.vocab_size))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text, encoded in parallel by the library's own threads."""
        dtype = token_dtype(self.vocab_size)
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=dtype) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens included; out-of-range ids become U+FFFD."""
        return _decode_runs(
            _as_int_array(ids),
            self.vocab_size,
            lambda run: self._tok.decode(run, skip_special_tokens=False),
        )

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one id stands for (special tokens: none). Byte-level BPE ids can be
        part of a character, so they are mapped back byte by byte, not decoded."""
        if token_id in self._special:
            return b""
        token = self._tok.id_to_token(token_id)
        if token is None:
            return b""
        if self._byte_level:
            alphabet = _byte_level_alphabet()
            return bytes(alphabet[c] for c in token if c in alphabet)
        return str(self._tok.decode([token_id])).encode("utf-8")

    def serialized(self) -> str:
        """The whole ``tokenizer.json`` (for fingerprints)."""
        return str(self._tok.to_str())

    def save(self, folder: Path) -> None:
        """Write ``tokenizer.json`` into ``folder``."""
        self._tok.save(str(folder / TOKENIZER_FILE))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers and tokenizing processes get the JSON, not the Rust object.
        state = {k: v for k, v in self.__dict__.items() if k != "_tok"}
        state["_json"] = self.serialized()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        text = state.pop("_json")
        self.__dict__.update(state)
        self._tok = _tokenizers_library().Tokenizer.from_str(text)

    def __repr__(self) -> str:
        return f"JSONTokenizer({self.name}, {self.path}, vocab_size={self.vocab_size})"


def save_tokenizer(tokenizer: Tokenizer, folder: str | os.PathLike[str]) -> Path:
    """Write ``tokenizer`` into ``folder`` (created) so :func:`load_tokenizer` reads it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "kind": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
    }
    if isinstance(tokenizer, JSONTokenizer):
        tokenizer.save(folder)
        meta["eos_token"] = tokenizer.eos_token
    elif not isinstance(tokenizer, ByteTokenizer):
        raise TypeError(f"cannot save a {type(tokenizer).__name__}: only byte, bpe and hf")
    (folder / TOKENIZER_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return folder


def load_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer | None:
    """The tokenizer :func:`save_tokenizer` wrote into ``folder``; a folder with only a
    ``tokenizer.json`` (a Hugging Face one) gives that; None when it holds neither.

    Raises:
        ConfigError: the files are there but cannot be read as a tokenizer.
    """
    folder = Path(folder)
    meta_file = folder / TOKENIZER_META
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{meta_file} cannot be read ({exc}); save the model again") from None
        if meta.get("kind") == "byte":
            return ByteTokenizer()
        kind, eos = str(meta.get("kind", "hf")), meta.get("eos_token")
        return JSONTokenizer(folder, kind=kind, eos_token=eos, key=str(meta_file))
    if (folder / TOKENIZER_FILE).is_file():
        return JSONTokenizer(folder, kind="hf", key=str(folder / TOKENIZER_FILE))
    return None
