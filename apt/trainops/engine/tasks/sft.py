"""``sft``: supervised fine-tuning on prompt/completion or chat examples.

The model, the loss and the loop are those of ``causal_lm``; what differs is the data: the
examples of ``data.source: {kind: sft, path: FILE.jsonl}``, rendered by a chat template, with
labels on the completion (assistant) tokens only, so the loss, ``count_targets`` and the
validation metrics cover those tokens and nothing else. Packed rows carry ``document_ids`` so
that attention stays inside each example.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from apt.core.config import DataConfig
from apt.core.config.data import SFTSource
from apt.core.errors import ConfigError
from apt.trainops.engine.tasks.base import StepOutput
from apt.trainops.engine.tasks.causal_lm import CausalLMTask

__all__ = ["SFTTask"]

log = logging.getLogger("apt")


class SFTTask(CausalLMTask):
    """Next-token cross-entropy on the completions of fine-tuning examples.

    Reads ``data.source: {kind: sft, ...}`` (:func:`~apt.trainops.data.sft.build_sft_datasets`);
    the validation examples are ``data.source.val_path`` or a share of the training file held
    out with ``training.seed``. Batches of unpacked examples (``packing: false``) are padded to
    their longest row (:meth:`collate`), the padding labelled -100.
    """

    name = "sft"

    def build_datasets(
        self, cfg: DataConfig, *, seed: int
    ) -> tuple[Dataset[Any], Dataset[Any] | None]:
        """The training and validation examples of ``cfg.source`` (one log line says what).

        Raises:
            ConfigError: the source is not ``{kind: sft}``, or its template cannot be built.
            DataError: a missing or malformed example file (file and line named).
        """
        from apt.trainops.data.sft import build_sft_datasets

        bundle = build_sft_datasets(cfg, seed=seed)
        log.info("%s", bundle.description)
        return bundle.train, bundle.val

    def collate(self, data: DataConfig | None = None) -> Callable[[list[Any]], Any] | None:
        """:func:`~apt.trainops.data.sft.join_collate` under ``data.source.padding_free`` (a
        batch's examples in one row, no padding); else :func:`~apt.trainops.eval.pad_collate`:
        rows of one length (packed) are stacked as they are, examples of unequal length are
        padded at the end, labels -100."""
        if data is not None and isinstance(data.source, SFTSource) and data.source.padding_free:
            from apt.trainops.data.sft import join_collate

            return join_collate
        from apt.trainops.eval.padding import pad_collate  # eval imports the tasks

        return pad_collate

    def train_step(
        self, model: nn.Module, batch: Any, criterion: Callable[..., torch.Tensor]
    ) -> StepOutput:
        """``causal_lm``'s step, after checking that a packed batch reaches a model that keeps
        its examples apart (a logits-only model would silently let them attend to each other).

        Raises:
            ConfigError: packed rows, but the model's forward takes no document_ids.
        """
        self._documents(batch, model)
        return super().train_step(model, batch, criterion)

    def _documents(self, batch: Any, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"document_ids": ...}`` of a packed batch.

        Raises:
            ConfigError: packed rows, but the model's forward takes no document_ids.
        """
        if not isinstance(batch, dict) or "document_ids" not in batch:
            return {}
        if not self._takes("document_ids", model):
            raise ConfigError(
                "data.source.packing (or padding_free) is on but the model's forward takes no "
                "document_ids, so packed examples would attend to each other. To fix: use an "
                "APT model, or set data.source.packing: false and padding_free: false (one "
                "example a row)."
            )
        return {"document_ids": batch["document_ids"]}
