"""SIGKILL at each point of a save (a real process, killed by the fault hook), then resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apt.trainops.checkpoints import CheckpointManager

REPO = Path(__file__).resolve().parents[4]

# Saves the steps in argv[2] in order; the weights differ at every save (version = index).
SCRIPT = textwrap.dedent("""
    import sys, torch
    from apt.trainops.checkpoints import CheckpointManager
    save_dir, plan, use_async = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    model = torch.nn.Linear(64, 64)
    manager = CheckpointManager(save_dir=save_dir, async_save=use_async, keep_last_n=5)
    for version, step in enumerate(int(s) for s in plan.split(",")):
        with torch.no_grad():
            model.weight.fill_(float(version))
        manager.save(step, model=model, trainer_state={"version": version})
    manager.close()
    print("finished")
""")


def _run(save_dir: Path, plan: str, fault: str, use_async: bool = False):
    env = {
        **os.environ,
        "APT_FAULT_INJECT": fault,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(save_dir), plan, "1" if use_async else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _debris(save_dir: Path) -> list[str]:
    return sorted(p.name for p in save_dir.iterdir() if p.name.startswith(".tmp-"))


# (fault, plan, async, step resumed from, its version, debris left by the kill)
CASES = [
    ("kill_before_manifest@2", "1,2", False, 1, 0, [".tmp-step-000000002"]),
    ("kill_before_rename@2", "1,2", False, 1, 0, [".tmp-step-000000002"]),
    ("kill_in_async_write@2", "1,2", True, 1, 0, [".tmp-step-000000002"]),
    # re-saving step 2: the old step-2 was moved aside when the kill came; it is put back
    (
        "kill_mid_replace@2",
        "1,2,2",
        False,
        2,
        1,
        [".tmp-replaced-step-000000002", ".tmp-step-000000002"],
    ),
    # renamed into place, LATEST not yet updated: the checkpoint is complete and is used
    ("kill_before_latest@2", "1,2", False, 2, 1, []),
]


@pytest.mark.parametrize(
    ("fault", "plan", "use_async", "step", "version", "debris"), CASES, ids=[c[0] for c in CASES]
)
def test_kill_during_save_then_resume(tmp_path, fault, plan, use_async, step, version, debris):
    save_dir = tmp_path / "ck"
    proc = _run(save_dir, plan, fault, use_async)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "finished" not in proc.stdout
    assert _debris(save_dir) == debris
    latest_before = (save_dir / "LATEST").read_text().strip()
    assert latest_before == "step-000000001" or fault.startswith("kill_mid_replace")
    if fault.startswith("kill_before_rename"):
        assert (save_dir / ".tmp-step-000000002/MANIFEST.json").is_file()  # still not visible

    model = torch.nn.Linear(64, 64)
    manager = CheckpointManager(save_dir=save_dir, keep_last_n=5)
    loaded = manager.load_latest(model=model)
    assert loaded is not None and loaded.step == step
    assert loaded.trainer_state == {"version": version}
    assert torch.all(model.weight == float(version))

    manager.save(3, model=model)  # the next save leaves no debris
    assert _debris(save_dir) == []
    assert (save_dir / "LATEST").read_text().strip() == "step-000000003"
    assert CheckpointManager(save_dir=save_dir).load_latest().step == 3


def test_unarmed_hook_does_nothing(tmp_path):
    proc = _run(tmp_path / "ck", "1,2", "kill_before_rename@7")
    assert proc.returncode == 0 and "finished" in proc.stdout, proc.stderr
    assert [i.step for i in CheckpointManager(save_dir=tmp_path / "ck").list_checkpoints()] == [
        1,
        2,
    ]
