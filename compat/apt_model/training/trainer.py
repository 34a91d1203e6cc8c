"""Legacy ``apt_model.training.trainer`` (APT 1.x): now :mod:`apt.trainops.engine`.

``Trainer`` and ``Finetuner`` are the 2.0 classes; :func:`train_model` is the 1.x entry point,
running the 2.0 engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from apt.core.config import APTConfig
from apt.core.errors import ConfigError
from apt.core.registry import closest_names
from apt.trainops.data import Tokenizer, build_tokenizer
from apt.trainops.engine import Callback, Finetuner, Trainer
from apt_model._deprecation import warn_moved

warn_moved("apt_model.training.trainer", "apt.trainops.engine")

__all__ = ["Finetuner", "Trainer", "train_model"]

#: 1.x ``train_model`` keywords without a 2.0 counterpart -> what replaces them.
REMOVED_KEYWORDS: dict[str, str] = {
    "logger": "the 'apt' logger prints each event (logging.getLogger('apt')); metrics go to "
    "the monitoring: section (jsonl, TensorBoard, W&B, MLflow)",
    "resource_monitor": "the monitoring: section (throughput and memory are logged per step)",
    "multimodal_config": "nothing: APT 2.0 trains text language models",
    "tokenizer_type": "data.tokenizer in the config",
    "language": "data.tokenizer in the config",
    "tokenizer": "data.tokenizer in the config, or dataloader= with your own token ids",
    "texts": "data.source in the config (python_stdlib or files), or dataloader=",
    "enable_guard": "training.on_nonfinite in the config (stop, skip_step or continue)",
    "guard_verbose": "training.on_nonfinite in the config",
    "max_time_hours": "nothing: SIGTERM or Ctrl-C saves a checkpoint and the same command "
    "resumes (training.auto_resume)",
    "early_stopping_patience": "callbacks: [{name: early_stopping, patience: N}] in the config",
}

_KEYWORDS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "save_path",
    "config",
    "model",
    "dataloader",
    "eval_dataloader",
    "callbacks",
    "accumulation_steps",
    "max_steps",
)


def _refuse(keywords: dict[str, Any]) -> None:
    lines = []
    for key in sorted(keywords):
        if key in REMOVED_KEYWORDS:
            lines.append(f"{key}: removed in APT 2.0; use {REMOVED_KEYWORDS[key]}")
        else:
            near = closest_names(key, list(_KEYWORDS))
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            lines.append(f"{key}: unknown keyword{hint}; valid: {', '.join(_KEYWORDS)}")
    raise ConfigError("train_model():\n  - " + "\n  - ".join(lines))


def _config(config: APTConfig | str | Path | None) -> APTConfig | None:
    if config is None or isinstance(config, APTConfig):
        return config
    return APTConfig.from_yaml(config)


def train_model(
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    save_path: str | Path | None = None,
    *,
    config: APTConfig | str | Path | None = None,
    model: nn.Module | None = None,
    dataloader: Any = None,
    eval_dataloader: Any = None,
    callbacks: Sequence[Callback] = (),
    accumulation_steps: int | None = None,
    max_steps: int | None = None,
    **removed: Any,
) -> tuple[nn.Module, Tokenizer | None, APTConfig]:
    """Train with the 2.0 engine, the 1.x way: ``model, tokenizer, config = train_model(...)``.

    Each argument left as None keeps the config's value (the schema's default without a
    config); the 1.x defaults (20 epochs, batch size 8, learning rate 3e-5) no longer apply.
    The config's ``schedules:`` run through the engine's built-in curriculum (2.0 semantics:
    docs/migration.md).

    Args:
        epochs: ``training.num_epochs`` (a ``training.max_steps`` in the config still applies:
            the run ends at whichever comes first).
        batch_size: ``training.batch_size``.
        learning_rate: ``training.learning_rate``.
        save_path: the run folder (``artifacts.output_dir`` / ``artifacts.experiment_name``);
            the trained model is exported to ``<save_path>/final_model``.
        config: an :class:`APTConfig`, or a profile path (1.x fields are translated, as by
            ``apt_model.config.from_yaml``).
        model: your model (default: built from ``config.model``).
        dataloader: your training loader of ``(inputs, targets)`` tuples or dicts with
            ``input_ids`` (default: built from ``config.data``).
        eval_dataloader: your validation loader (default: from ``config.data`` when
            ``dataloader`` is not given, else none).
        callbacks: 1.x ``TrainingCallback`` instances or 2.0 ``Callback`` instances.
        accumulation_steps: ``training.gradient_accumulation_steps``.
        max_steps: ``training.max_steps``.

    Returns:
        ``(model, tokenizer, config)``: the trained model (unwrapped from DDP/FSDP), the
        tokenizer of ``config.data`` (None when you passed ``dataloader``), and the config
        the run used.

    Raises:
        ConfigError: a 1.x keyword that APT 2.0 replaced (the message names the replacement),
            an unknown keyword, a callback that is not a ``Callback``, or an invalid config.
    """
    if removed:
        _refuse(removed)
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise ConfigError(
                f"train_model(callbacks=...): callbacks[{i}] ({type(callback).__name__}) is not "
                "a callback; derive it from apt_model.training.callbacks.TrainingCallback (1.x "
                "hooks) or apt.trainops.engine.Callback"
            )
    folder = Path(save_path) if save_path is not None else None
    trainer = Trainer(
        model,
        train_dataloader=dataloader,
        eval_dataloader=eval_dataloader,
        config=_config(config),
        callbacks=list(callbacks),
        num_epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        gradient_accumulation_steps=accumulation_steps,
        max_steps=max_steps,
        output_dir=str(folder.parent) if folder is not None else None,
        experiment_name=folder.name if folder is not None else None,
    )
    trainer.train()
    trained = trainer.strategy.unwrap(trainer.model)
    tokenizer = build_tokenizer(trainer.config.data.tokenizer) if dataloader is None else None
    return trained, tokenizer, trainer.config
