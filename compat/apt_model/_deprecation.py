"""One DeprecationWarning per legacy module, naming its replacement."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Warn that ``old`` is a legacy import path and ``new`` is where it lives now."""
    warnings.warn(
        f"{old} is deprecated; import from {new} instead", DeprecationWarning, stacklevel=3
    )
