"""The deterministic train/validation split of a file list, and the byte caps of each side."""

from __future__ import annotations

import hashlib
import math

from apt.core.errors import DataError
from apt.trainops.data.corpus import CorpusFile

__all__ = ["split_caps", "split_files"]


def _split_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


def split_files(
    files: list[CorpusFile], val_fraction: float, *, key: str = "data.train_files"
) -> tuple[list[CorpusFile], list[CorpusFile]]:
    """Hold out ``round(len(files) * val_fraction)`` files (at least one, at most all but one).

    Files are ranked by the sha256 of their *relative* path and the first ones go to validation,
    so the split depends only on the set of relative paths: the same on every machine, in every
    process, whatever the absolute location or the order the files were listed in.

    Args:
        files: the corpus, any order; relative paths must be unique.
        val_fraction: share of files held out, in ``(0, 1)``.
        key: config key named in error messages.

    Returns:
        ``(train, val)``, each sorted by relative path; disjoint, and together all of ``files``.

    Raises:
        DataError: fewer than two files (one file cannot be split by file).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(files) < 2:
        names = ", ".join(str(f.path) for f in files) or "nothing"
        raise DataError(
            f"{key} matched {len(files)} file ({names}), but the validation split holds out whole "
            "files and needs at least 2. Set data.val_files to a separate file, or split the text "
            "into several files."
        )
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    ranked = sorted(files, key=lambda f: (_split_hash(f.rel), f.rel))
    val_rels = {f.rel for f in ranked[:n_val]}
    by_rel = sorted(files, key=lambda f: f.rel)
    train = [f for f in by_rel if f.rel not in val_rels]
    val = [f for f in by_rel if f.rel in val_rels]
    return train, val


def split_caps(max_bytes: int | None, val_fraction: float) -> tuple[int | None, int | None]:
    """Byte caps ``(train, val)`` for a training cap of ``max_bytes``.

    Validation gets ``max_bytes * val_fraction / (1 - val_fraction)`` (rounded up), the share it
    would have had of a corpus whose training part is ``max_bytes``; so a small quickstart cap
    keeps validation loading just as fast. ``None`` means no cap on either side.
    """
    if max_bytes is None:
        return None, None
    return max_bytes, max(1, math.ceil(max_bytes * val_fraction / (1.0 - val_fraction)))
