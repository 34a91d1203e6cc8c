"""ByteTokenizer and the tokenizer registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apt.core.errors import ConfigError
from apt.trainops.data import TOKENIZERS, ByteTokenizer, build_tokenizer, token_dtype


def test_round_trip_ascii_and_unicode() -> None:
    tok = ByteTokenizer()
    for text in ["", "def main():\n    return 0\n", "héllo wörld — 你好 🙂"]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
        arr = tok.encode_array(text)
        assert arr.dtype == np.uint8
        assert arr.tolist() == ids
        assert tok.decode(arr) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_decode_never_raises() -> None:
    tok = ByteTokenizer()
    assert tok.decode([0xFF, 104, 105]) == "\ufffdhi"
    # An id beyond the byte range (a bigger model vocabulary) becomes U+FFFD, and does not merge
    # the bytes around it: 0xC3 | 300 | 0xA9 is not "é".
    assert tok.decode([104, 300, 105]) == "h\ufffdi"
    assert tok.decode([0xC3, 300, 0xA9]) == "\ufffd\ufffd\ufffd"
    assert tok.decode([-1]) == "\ufffd"


def test_registry_and_sizes() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("byte", 256, 0)
    assert "byte" in TOKENIZERS.names()
    with pytest.raises(ConfigError, match=r"unknown tokenizer 'bytes'.*Did you mean 'byte'"):
        build_tokenizer("bytes")
    assert token_dtype(256) == np.uint8
    assert token_dtype(257) == np.uint16
    assert token_dtype(50304) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
