"""Run artifacts: the run folder and its lock, config snapshot, environment, metrics, log file,
plots and exported models."""

from apt.trainops.artifacts.environment import describe_environment
from apt.trainops.artifacts.errors import ExportError, RunFolderError, RunLockedError
from apt.trainops.artifacts.export import write_model
from apt.trainops.artifacts.manager import LOG_FILE, ArtifactManager, check_folder_name, is_inside
from apt.trainops.artifacts.plots import write_plots
from apt.trainops.artifacts.run_lock import LOCK_NAME, RunLock

__all__ = [
    "LOCK_NAME",
    "LOG_FILE",
    "ArtifactManager",
    "ExportError",
    "RunFolderError",
    "RunLock",
    "RunLockedError",
    "check_folder_name",
    "describe_environment",
    "is_inside",
    "write_model",
    "write_plots",
]
