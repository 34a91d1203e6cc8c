"""The model a checkpoint holds, rebuilt in one process as a plain model to score or export.

A checkpoint records the run's config: the model is built from it, ``finetune:`` is applied
as the run applied it (LoRA adapters, the ``finetune.align`` reference), so the saved tensors
fit under their own names whatever strategy wrote them (one file, or DCP shards of any layout);
then the adapters are merged into their weights and the align reference dropped, which leaves
what the run's own export would have written::

    trained = load_trained_model("runs/tiny/checkpoints")     # the newest that verifies
    trained.model, trained.step, trained.tokenizer
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from apt.core.config import APTConfig
from apt.core.errors import CheckpointError

__all__ = ["TrainedModel", "load_trained_model"]

log = logging.getLogger("apt")


@dataclass
class TrainedModel:
    """A checkpoint's model, and where it came from.

    Attributes:
        model: the plain model (adapters merged, no align reference), in eval mode, on the CPU.
        config: the run's config, as the checkpoint records it.
        tokenizer: the run's saved tokenizer, or the ``data.tokenizer`` spec to build one.
        step: the optimizer step the checkpoint was taken at.
        path: the checkpoint's step folder.
        merged: names of the linear layers whose LoRA adapters were merged (empty without).
    """

    model: nn.Module
    config: APTConfig
    tokenizer: Any
    step: int
    path: Path
    merged: list[str]

    @property
    def run_dir(self) -> Path:
        """The run folder the checkpoint belongs to."""
        return self.path.parent.parent


def load_trained_model(path: str | Path) -> TrainedModel:
    """The model of the checkpoint ``path`` names: a step folder as it is; a checkpoints
    folder, or a run folder holding ``checkpoints/``, its newest checkpoint that verifies.

    Raises:
        CheckpointError: no such folder, no checkpoint in it, none that verifies, one without
            a run config, or tensors that do not fit the model its config builds.
        ConfigError: its config no longer validates.
    """
    from apt.core.config import config_from_dict
    from apt.core.config.distributed import DistributedConfig
    from apt.model import APTModel
    from apt.model.layers.lora import merge_lora
    from apt.model.tokenizers import load_tokenizer
    from apt.trainops.checkpoints import ShardedStatePayload, describe_parts
    from apt.trainops.checkpoints.loading import (
        read_checkpoint,
        read_trainer_state,
        verified_checkpoint,
    )
    from apt.trainops.distributed import DistEnv, SingleStrategy
    from apt.trainops.engine.freeze import apply_finetune
    from apt.trainops.engine.tasks import build_task

    ckpt = verified_checkpoint(Path(path).expanduser())
    where = ckpt.path / "trainer_state.json"
    saved = read_trainer_state(ckpt).get("config")
    if not isinstance(saved, dict) or not saved:
        raise CheckpointError(
            f"{where}: records no run config, so the model cannot be rebuilt. Use a "
            "checkpoint the Trainer wrote, or export the model and load that folder."
        )
    cfg = config_from_dict(saved, source=str(where))
    model = build_task(cfg.training.task).build_model(cfg.model)
    if cfg.finetune.lora is not None or cfg.finetune.align is not None:
        # The adapters and the align reference are model state: build them to receive theirs.
        apply_finetune(cfg.finetune.model_copy(update={"freeze": []}), model=model)
    payload = ShardedStatePayload(SingleStrategy(DistributedConfig(), env=DistEnv.single()))
    parts = describe_parts({"model": model})
    loaded = read_checkpoint(ckpt, payload, parts, rank=0, map_location="cpu", restore_rng=False)
    merged = merge_lora(model)
    if isinstance(model, APTModel) and model.config.align is None:
        model.align = None  # finetune.align's reference: not part of the trained network
    for p in model.parameters():
        p.requires_grad_(True)  # a loaded model trains everywhere again, as from_pretrained's
    if merged:
        log.info("merged the LoRA adapters of %d linear layers into their weights", len(merged))
    saved_tokenizer = load_tokenizer(ckpt.path.parent.parent / "tokenizer")  # the run's copy
    return TrainedModel(
        model=model.eval(),
        config=cfg,
        tokenizer=saved_tokenizer or cfg.data.tokenizer,
        step=loaded.step,
        path=ckpt.path,
        merged=merged,
    )
