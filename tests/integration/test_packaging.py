"""The wheel carries the profiles and the legacy package: load_profile works outside the repo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_profiles_and_compat_and_works_from_anywhere(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("apt_transformer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("apt/profiles/") and n.endswith(".yaml")}
    in_repo = {
        f"apt/profiles/{p.relative_to(REPO / 'apt' / 'profiles')}"
        for p in (REPO / "apt" / "profiles").rglob("*.yaml")
    }
    assert shipped == in_repo and "apt/profiles/standard.yaml" in shipped
    assert "apt_model/training/callbacks.py" in names
    assert not any(n.startswith(("tests/", "compat/", "profiles/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "apt-train = apt.cli.main:main" in scripts and "\napt =" not in scripts

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import apt; from apt import load_profile; "
        "print(apt.__file__); print(load_profile('standard').model.hidden_size)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
    )
    assert out.returncode == 0, out.stderr
    where, size = out.stdout.split()
    assert where.startswith(str(site)) and size == "768"
