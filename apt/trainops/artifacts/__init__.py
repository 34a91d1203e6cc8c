"""Run artifacts: the run folder and its lock, config snapshot, metrics and exported models."""

from apt.trainops.artifacts.errors import ExportError, RunFolderError, RunLockedError
from apt.trainops.artifacts.export import write_model
from apt.trainops.artifacts.manager import ArtifactManager, check_folder_name, is_inside
from apt.trainops.artifacts.run_lock import LOCK_NAME, RunLock

__all__ = [
    "LOCK_NAME",
    "ArtifactManager",
    "ExportError",
    "RunFolderError",
    "RunLock",
    "RunLockedError",
    "check_folder_name",
    "is_inside",
    "write_model",
]
