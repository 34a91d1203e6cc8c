"""``causal_lm``: next-token prediction on packed text (the default task)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from apt.core.config import DataConfig, ModelConfig
from apt.core.config.base import Section
from apt.core.errors import ConfigError, DataError
from apt.trainops.distributed import unwrap_model
from apt.trainops.engine.tasks.base import StepOutput, TrainingTask

__all__ = ["CausalLMTask", "split_batch"]

IGNORE_INDEX = -100


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` from a dict or an ``(inputs, targets)`` tuple.

    Dicts need ``input_ids``; ``labels`` default to the inputs shifted left by one (the last
    position ignored), and positions where ``attention_mask`` is 0 are ignored.
    """
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise DataError(
                f"a causal_lm batch must hold 'input_ids' (got keys {sorted(batch)}); "
                "return {'input_ids': ..., 'labels': ...} or an (inputs, targets) tuple"
            )
        input_ids = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
            labels[:, :-1] = input_ids[:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        return input_ids, labels
    if isinstance(batch, list | tuple) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataError(
        f"cannot read a causal_lm batch of type {type(batch).__name__}; use a dict with "
        "'input_ids' (and optional 'labels', 'attention_mask') or an (inputs, targets) tuple"
    )


def _loss_parts(out: Any) -> dict[str, torch.Tensor]:
    """What an APT model's loss is made of, detached, beside its other statistics: with
    auxiliary losses on (MoE balance and z, align_kl), ``lm_loss`` and each of them (their sum
    is the loss); nothing more for a plain language model, whose loss is ``lm_loss``."""
    aux = dict(getattr(out, "aux_losses", {}) or {})
    parts = {name: value.detach() for name, value in aux.items()}
    if parts and getattr(out, "lm_loss", None) is not None:
        parts["lm_loss"] = out.lm_loss.detach()
    return {**parts, **(getattr(out, "stats", {}) or {})}


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(unwrap_model(model).forward).parameters)
    except (TypeError, ValueError):
        return set()


class CausalLMTask(TrainingTask):
    """Next-token prediction with cross-entropy on packed text: the language-modelling task.

    Models that accept ``targets=`` (APT models) compute their own loss, auxiliary losses
    included; any other module must return logits ``(B, T, V)``."""

    name = "causal_lm"
    loss_is_cross_entropy = True

    def __init__(self, options: Section | None = None) -> None:
        super().__init__(options)
        self._forward_takes: set[str] | None = None

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        from apt.model import build_model

        return build_model(cfg)

    def build_datasets(
        self, cfg: DataConfig, *, seed: int
    ) -> tuple[Dataset[Any], Dataset[Any] | None]:
        from apt.trainops.data import build_datasets

        bundle = build_datasets(cfg)
        return bundle.train, bundle.val

    def build_criterion(self) -> Callable[..., torch.Tensor]:
        def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )

        return cross_entropy

    can_pad = True

    def without_targets(self, sample: Any) -> Any:
        """The sample with every label ignored (``-100``)."""
        if isinstance(sample, dict):
            return {**sample, "labels": torch.full_like(sample["input_ids"], IGNORE_INDEX)}
        inputs, targets = sample
        return inputs, torch.full_like(targets, IGNORE_INDEX)

    def count_targets(self, batch: Any) -> int:
        _, labels = split_batch(batch)
        return int((labels != IGNORE_INDEX).sum())

    def count_target_bytes(self, batch: Any, token_bytes: torch.Tensor) -> int:
        """UTF-8 bytes of the batch's targets (``token_bytes[id]`` summed over them), for
        ``val_bpb``; called on the CPU batch, like ``count_targets``."""
        from apt.trainops.data.tokenizers import count_token_bytes

        _, labels = split_batch(batch)
        return count_token_bytes(labels[labels != IGNORE_INDEX], token_bytes)

    def token_targets(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` of ``batch`` (:func:`split_batch`).

        Raises:
            ConfigError: the batch carries ``document_ids``, which a pipeline's stages cannot
                pass on.
        """
        if isinstance(batch, dict) and "document_ids" in batch:
            raise ConfigError(
                "training.distributed.strategy pipeline cannot keep the documents of packed "
                "rows apart (the document ids do not travel between stages): set "
                "data.document_mask: false (for sft: data.source.packing: false), or use "
                "another strategy"
            )
        return split_batch(batch)

    def _documents(self, batch: Any, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{"document_ids": ...}`` for a batch that carries them (``data.document_mask``).

        Raises:
            ConfigError: the batch has them but the model's forward cannot take them.
        """
        if not isinstance(batch, dict) or "document_ids" not in batch:
            return {}
        if not self._takes("document_ids", model):
            raise ConfigError(
                "data.document_mask is on but the model's forward takes no document_ids; "
                "use an APT model or set data.document_mask: false"
            )
        return {"document_ids": batch["document_ids"]}

    def train_step(
        self, model: nn.Module, batch: Any, criterion: Callable[..., torch.Tensor]
    ) -> StepOutput:
        input_ids, labels = split_batch(batch)
        if self._targets_ok(model):
            # The step needs the loss only: logits that stay inside a compiled graph are
            # never written out (APT models: return_logits=False).
            loss_only = {"return_logits": False} if self._takes("return_logits", model) else {}
            out = model(input_ids, targets=labels, **loss_only, **self._documents(batch, model))
            return StepOutput(loss=out.loss, stats=_loss_parts(out))
        logits = model(input_ids)
        logits = getattr(logits, "logits", logits)
        return StepOutput(loss=criterion(logits, labels))

    def validation_step(
        self, model: nn.Module, batch: Any, criterion: Callable[..., torch.Tensor]
    ) -> StepOutput:
        """The loss, plus totals for ``val_accuracy`` (the voter's choice where it is on),
        ``val_entropy`` (mean next-token entropy, nats) and ``val_voter_fired``."""
        input_ids, labels = split_batch(batch)
        documents = self._documents(batch, model)
        out = (
            model(input_ids, targets=labels, **documents)
            if self._targets_ok(model)
            else model(input_ids, **documents)
        )
        logits = getattr(out, "logits", out)  # (B, T, V)
        loss = out.loss if getattr(out, "loss", None) is not None else criterion(logits, labels)
        mask = labels != IGNORE_INDEX  # (B, T)
        logp = F.log_softmax(logits.float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
        predict = getattr(unwrap_model(model), "predict_tokens", None)
        if predict is not None:
            # A private generator: evaluation must not move the training RNG streams.
            gen = torch.Generator(device=logits.device).manual_seed(0)
            tokens, fired = predict(logits, generator=gen)
        else:
            tokens, fired = logits.argmax(-1), torch.zeros_like(mask)
        totals = {
            "accuracy": ((tokens == labels) & mask).sum(),
            "entropy": (entropy * mask).sum(),
        }
        if getattr(unwrap_model(model), "voter", None) is not None:
            totals["voter_fired"] = (fired & mask).sum()
        return StepOutput(loss=loss, totals=totals)

    def _targets_ok(self, model: nn.Module) -> bool:
        return self._takes("targets", model)

    def _takes(self, parameter: str, model: nn.Module) -> bool:
        if self._forward_takes is None:
            self._forward_takes = _forward_parameters(model)
        return parameter in self._forward_takes
