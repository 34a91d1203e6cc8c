"""The README opens with the two commands CI and users run; keep them true."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_opens_with_the_main_job_and_the_test_command() -> None:
    commands = readme_commands()
    assert commands[0] == (
        "python -m pip install -e . -c constraints.txt && python -m apt train --profile quickstart"
    )
    assert commands[1].endswith("&& python -m pytest")
    head = (REPO / "README.md").read_text().split("## ")[0]
    assert head.count("```bash") == 2


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert readme_commands()[1] in ci_lines


def test_no_console_script_named_apt() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]")[1].split("[")[0]
    assert re.search(r'^apt-train = "apt.cli.main:main"$', scripts, re.M)
    assert not re.search(r'^"?apt"?\s*=', scripts, re.M)
