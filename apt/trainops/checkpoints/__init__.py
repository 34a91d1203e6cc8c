"""Checkpoints that survive a kill at any moment: transactional saves, verified loads, retention.

>>> manager = CheckpointManager(save_dir="checkpoints/", save_interval=500, keep_last_n=5)
>>> manager.save(1000, model=model, optimizer=optimizer)          # doctest: +SKIP
>>> manager.load("checkpoint-1000", model=model, optimizer=optimizer)  # doctest: +SKIP
>>> manager.load_latest(model=model, optimizer=optimizer, restore_rng=True)  # doctest: +SKIP

Format, commit protocol and guarantees: ``docs/checkpoints.md``.
"""

from apt.trainops.checkpoints.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSaveError,
)
from apt.trainops.checkpoints.fsio import StageFiles
from apt.trainops.checkpoints.loading import LoadedCheckpoint
from apt.trainops.checkpoints.manager import CheckpointManager, SaveStats
from apt.trainops.checkpoints.manifest import FORMAT_VERSION, VerifiedCheckpoint
from apt.trainops.checkpoints.parts import Part, describe_parts
from apt.trainops.checkpoints.payload import FullStatePayload, GatheredStatePayload, Payload
from apt.trainops.checkpoints.retention import CheckpointInfo, RetentionPolicy, select_kept
from apt.trainops.checkpoints.rng import capture_rng_state, restore_rng_state
from apt.trainops.checkpoints.sharded import ShardedStatePayload
from apt.trainops.checkpoints.verify import verify_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointSaveError",
    "FullStatePayload",
    "GatheredStatePayload",
    "LoadedCheckpoint",
    "Part",
    "Payload",
    "RetentionPolicy",
    "SaveStats",
    "ShardedStatePayload",
    "StageFiles",
    "VerifiedCheckpoint",
    "capture_rng_state",
    "describe_parts",
    "restore_rng_state",
    "select_kept",
    "verify_checkpoint",
]
