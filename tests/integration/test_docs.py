"""Every code block in docs/ and the README runs as written.

* ``python`` blocks: each page's blocks run in order, in one fresh interpreter in an empty
  folder (a block may use what an earlier block of its page defined).
* ``yaml`` blocks: profile fragments; each is loaded on top of ``quickstart`` and validated.
* ``bash`` blocks: each ``python -m apt ...`` line runs in that page's folder and must exit 0.

A block that cannot run here says so in a comment on the line above it,
``<!-- docs-test: gpu -->`` (needs CUDA: run by the GPU session) or
``<!-- docs-test: skip, <why> -->``; a skip without a reason fails the test. Blocks without a
language (diagrams, file trees) are text.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PAGES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"<!--\s*docs-test:\s*(gpu|skip)\s*(?:,\s*(.*?))?\s*-->")
_README_SETUP = ("python -m pip install",)  # the README's two set-up commands: test_readme


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    mark: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        mark = _MARK.search(lines[start - 1]) if start else None
        found.append(
            Block(
                page,
                start + 1,
                fence[1],
                "\n".join(body) + "\n",
                mark[1] if mark else None,
                (mark[2] or "") if mark else "",
            )
        )
        i += 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("APT_PROFILE_PATH", None)
    env["APT_HOME"] = tempfile.mkdtemp(prefix="apt_home-")  # never the user's model store
    return env


def _runnable(block: Block) -> bool:
    if block.mark == "skip":
        return False
    return not (block.mark == "gpu" and not torch.cuda.is_available())


def test_every_skip_says_why() -> None:
    silent = [str(b) for b in ALL if b.mark == "skip" and not b.reason]
    assert silent == [], f"docs-test: skip needs a reason: {silent}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    code = [b for b in blocks(page) if b.lang == "python" and _runnable(b)]
    if not code:
        pytest.skip("no python block")
    script = "".join(f"# --- {b}\n{b.code}" for b in code)
    (tmp_path / "doc_blocks.py").write_text(script, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "doc_blocks.py"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{page.name}: a python block failed\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "yaml"], ids=str)
def test_yaml_blocks_are_valid_profiles(block: Block, tmp_path: Path) -> None:
    from apt import load_profile

    if not _runnable(block):
        pytest.skip(block.reason or "needs CUDA")
    text = (
        block.code
        if block.code.lstrip().startswith("extends:")
        else (f"extends: quickstart\n{block.code}")
    )
    profile = tmp_path / "doc.yaml"
    profile.write_text(text, encoding="utf-8")
    load_profile(profile)  # raises ConfigError naming the key on any drift


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "bash"], ids=str)
def test_bash_blocks_run(block: Block, tmp_path: Path) -> None:
    if not _runnable(block):
        pytest.skip(block.reason or "needs CUDA")
    for raw in block.code.splitlines():
        line = raw.split("  #")[0].strip()
        if not line or line.startswith("#") or line.startswith(_README_SETUP):
            continue
        proc = subprocess.run(
            line, shell=True, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{block}: `{shlex.quote(line)}` failed\n{proc.stderr[-3000:]}"
