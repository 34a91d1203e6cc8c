"""Taking a run folder for a run, the same outcome on every rank."""

from __future__ import annotations

from pathlib import Path

from apt.trainops.artifacts import ArtifactManager, RunFolderError, is_inside
from apt.trainops.checkpoints.layout import committed_dirs
from apt.trainops.distributed import DistEnv, distributed_errors

__all__ = ["claim_run_folder"]


def claim_run_folder(
    artifacts: ArtifactManager, *, env: DistEnv, checkpoint_dir: Path, new_run: bool
) -> None:
    """Lock the run folder (and a checkpoint folder outside it) on rank 0, for the run.

    Every rank learns rank 0's outcome, so a refusal ends the whole job with rank 0's error
    and exit code (2 for a folder in use) instead of leaving the others waiting at the next
    collective. Also refuses ``--new-run`` when checkpoints outside the run folder would be
    resumed: only the run folder itself is ever moved aside.
    """
    error: BaseException | None = None
    if env.is_main:
        try:
            artifacts.lock(checkpoints=checkpoint_dir)
            outside = not is_inside(checkpoint_dir, artifacts.run_dir)
            if new_run and outside and committed_dirs(checkpoint_dir):
                artifacts.unlock()
                raise RunFolderError(
                    f"--new-run moves only the run folder aside, and the checkpoints in "
                    f"{checkpoint_dir} (training.checkpoints.directory, outside the run "
                    "folder) would be resumed. Move them away, or set another "
                    "training.checkpoints.directory."
                )
        except Exception as exc:
            error = exc
    if env.world_size > 1:
        import torch.distributed as dist

        outcome = [None if error is None else (str(error), getattr(error, "exit_code", 1))]
        with distributed_errors(f"taking the run folder (rank {env.rank})"):
            dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None and not env.is_main:
            message, code = outcome[0]
            error = RunFolderError(f"rank {env.rank}: rank 0 stopped the run: {message}")
            error.exit_code = code
    if error is not None:
        raise error
