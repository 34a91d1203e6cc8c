"""Keyword construction: ``Trainer(max_steps=100, learning_rate=3e-4)`` -> a validated config.

Each keyword sets one config key and nothing else; every default is the schema's.
"""

from __future__ import annotations

from typing import Any

from apt.core.config import APTConfig, config_from_dict
from apt.core.errors import ConfigError
from apt.core.registry import closest_names

__all__ = ["KEYWORDS", "LENGTH_KEYWORDS", "config_with_keywords"]

#: Trainer keyword -> dotted config key (keyword construction, as in the design notes).
KEYWORDS = {
    "max_steps": "training.max_steps",
    "num_epochs": "training.num_epochs",
    "learning_rate": "training.learning_rate",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "max_grad_norm": "training.max_grad_norm",
    "on_nonfinite": "training.on_nonfinite",
    "max_skipped_steps": "training.max_skipped_steps",
    "precision": "training.precision",
    "device": "training.device",
    "seed": "training.seed",
    "compile": "training.compile",
    "compile_mode": "training.compile_mode",
    "float8": "training.float8",
    "task": "training.task",
    "auto_resume": "training.auto_resume",
    "checkpoint_dir": "training.checkpoints.directory",
    "save_interval": "training.checkpoints.save_interval",
    "distributed_config": "training.distributed",
    "eval_interval": "eval.interval",
    "monitoring": "monitoring",  # {"tensorboard": True, "wandb": True} or {"loggers": [...]}
    "output_dir": "artifacts.output_dir",
    "experiment_name": "artifacts.experiment_name",
}
#: The keywords that set the run length.
LENGTH_KEYWORDS = ("max_steps", "num_epochs")


def config_with_keywords(config: APTConfig | None, keywords: dict[str, Any]) -> APTConfig:
    """``config`` (default: the schema's defaults) with each keyword set at its config key.

    Raises:
        ConfigError: an unknown keyword (with the nearest names), or a value the schema rejects.
    """
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        hints = []
        for key in unknown:
            near = closest_names(key, list(KEYWORDS))
            hints.append(f"{key} (did you mean {near[0]!r}?)" if near else key)
        raise ConfigError(
            f"Trainer() got unknown keyword(s) {', '.join(hints)}; valid: "
            f"{', '.join(sorted(KEYWORDS))} (or pass config=load_profile(...))"
        )
    given = {k: v for k, v in keywords.items() if v is not None}
    if config is not None and not given:
        return config
    data = config.model_dump(mode="json") if config is not None else {}
    for key, value in given.items():
        node = data
        *parents, leaf = KEYWORDS[key].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            value = {**node[leaf], **value}
        node[leaf] = value
    return config_from_dict(data, source="Trainer(...) keywords")
