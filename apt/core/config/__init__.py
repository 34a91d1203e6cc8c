"""Validated run configuration: pydantic sections loaded from YAML profiles.

``load_profile("standard", overrides=["training.learning_rate=3e-4"])`` reads the YAML file
(strictly), merges its ``extends:`` parents, applies the overrides and validates the result into a
frozen :class:`APTConfig` that remembers where every value came from.
"""

from apt.core.config.callbacks import CallbackSpec
from apt.core.config.data import DataConfig
from apt.core.config.distributed import DistributedConfig
from apt.core.config.finetune import FinetuneAlignConfig, FinetuneConfig, LoRAConfig
from apt.core.config.loader import (
    config_from_dict,
    list_profiles,
    load_profile,
    profile_files,
    resolve_profile,
)
from apt.core.config.model import AlignConfig, ModelConfig, MoEConfig, VoterConfig
from apt.core.config.monitoring import MonitoringConfig
from apt.core.config.plugins import PluginSpec, TaskSpec, TokenizerSpec, validate_options
from apt.core.config.root import APTConfig
from apt.core.config.runtime import ArtifactsConfig, EvalConfig
from apt.core.config.schedules import AnnealSpec, SchedulesConfig
from apt.core.config.training import (
    CheckpointConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)

__all__ = [
    "APTConfig",
    "AlignConfig",
    "AnnealSpec",
    "ArtifactsConfig",
    "CallbackSpec",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "FinetuneAlignConfig",
    "FinetuneConfig",
    "LoRAConfig",
    "MoEConfig",
    "ModelConfig",
    "MonitoringConfig",
    "OptimizerConfig",
    "PluginSpec",
    "SchedulerConfig",
    "SchedulesConfig",
    "TaskSpec",
    "TokenizerSpec",
    "TrainingConfig",
    "VoterConfig",
    "config_from_dict",
    "list_profiles",
    "load_profile",
    "profile_files",
    "resolve_profile",
    "validate_options",
]
