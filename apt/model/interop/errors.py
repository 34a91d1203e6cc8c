"""The error a conversion to or from another format raises."""

from __future__ import annotations

from apt.core.errors import APTError

__all__ = ["InteropError"]


class InteropError(APTError, ValueError):
    """A model cannot be converted: it has a part the other format cannot hold (MoE layers,
    RoPE scaling other than llama3's, biases), or the folder to read or write cannot be used.
    The message names the part or the file, why, and what to do. CLI exit code 2; also a
    ``ValueError``."""

    exit_code = 2
