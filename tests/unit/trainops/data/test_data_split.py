"""Deterministic train/validation split by the hash of relative paths."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from apt.core.errors import DataError
from apt.trainops.data import resolve_files, split_caps, split_files
from apt.trainops.data.corpus import CorpusFile


def _tree(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"text of {name}\n")


def test_split_is_disjoint_complete_and_sorted(tmp_path: Path) -> None:
    names = [f"part{i // 10}/doc{i:03d}.txt" for i in range(100)]
    _tree(tmp_path, names)
    files = resolve_files([str(tmp_path / "**" / "*.txt")], key="data.train_files")
    train, val = split_files(files, 0.1)
    train_rels, val_rels = [f.rel for f in train], [f.rel for f in val]
    assert len(val) == 10 and len(train) == 90
    assert not set(train_rels) & set(val_rels)
    assert sorted(train_rels + val_rels) == sorted(names)
    assert train_rels == sorted(train_rels) and val_rels == sorted(val_rels)


def test_split_is_identical_across_locations_and_listing_order(tmp_path: Path) -> None:
    names = [f"doc{i:02d}.txt" for i in range(30)] + ["sub/a.txt", "sub/b.txt"]
    _tree(tmp_path / "machine_a", names)
    _tree(tmp_path / "elsewhere" / "machine_b", names)
    a = resolve_files([str(tmp_path / "machine_a" / "**" / "*.txt")], key="k")
    b_patterns = [str(tmp_path / "elsewhere" / "machine_b" / n) for n in names]
    random.Random(0).shuffle(b_patterns)
    b = resolve_files(b_patterns, key="k")
    split_a = [[f.rel for f in side] for side in split_files(a, 0.2)]
    split_b = [[f.rel for f in side] for side in split_files(b, 0.2)]
    assert split_a == split_b
    assert split_files(a, 0.2) == split_files(list(reversed(a)), 0.2)


def test_split_golden_values() -> None:
    # Pins the scheme (sha256 of the relative path): a change here changes every user's split.
    files = [CorpusFile(Path(f"/any/doc{i:02d}.txt"), f"doc{i:02d}.txt") for i in range(10)]
    assert [f.rel for f in split_files(files, 0.3)[1]] == ["doc02.txt", "doc03.txt", "doc07.txt"]
    files = [CorpusFile(Path(f"/other/{i}.txt"), f"sub/{i}.txt") for i in range(5)]
    assert [f.rel for f in split_files(files, 0.2)[1]] == ["sub/4.txt"]


@pytest.mark.parametrize(("fraction", "n_val"), [(0.001, 1), (0.5, 2), (0.999, 2)])
def test_each_side_keeps_at_least_one_file(fraction: float, n_val: int) -> None:
    files = [CorpusFile(Path(f"/d/{c}.txt"), f"{c}.txt") for c in "abc"]
    train, val = split_files(files, fraction)
    assert len(val) == n_val and len(train) == 3 - n_val


def test_one_file_cannot_be_split(tmp_path: Path) -> None:
    _tree(tmp_path, ["only.txt"])
    files = resolve_files([str(tmp_path / "only.txt")], key="data.train_files")
    with pytest.raises(DataError, match=r"only\.txt.*at least 2.*data\.val_files"):
        split_files(files, 0.1)


def test_split_caps() -> None:
    assert split_caps(None, 0.05) == (None, None)
    assert split_caps(3_000_000, 0.05) == (3_000_000, 157_895)
    assert split_caps(10, 0.5) == (10, 10)
    assert split_caps(1, 0.01) == (1, 1)
