"""Run artifacts: the run folder, config snapshot, metrics and exported models."""

from apt.trainops.artifacts.manager import ArtifactManager

__all__ = ["ArtifactManager"]
