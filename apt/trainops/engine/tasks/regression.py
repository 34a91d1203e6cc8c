"""``regression``: fit a noisy linear function with an MLP (the design notes' example task)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from apt.core.config import DataConfig, ModelConfig
from apt.trainops.engine.tasks.base import StepOutput, TrainingTask

__all__ = ["RegressionTask"]

_FEATURES = 16


class RegressionTask(TrainingTask):
    """An MLP fitting a noisy linear function with mean-squared error (a small demo task).

    The data is synthetic ``y = x @ w + noise`` (``x``: 16 features), generated from the
    training seed (1024 training and 256 validation samples); the model has
    ``model.num_layers`` hidden layers of ``model.hidden_size``.
    """

    name = "regression"

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        layers: list[nn.Module] = []
        width = _FEATURES
        for _ in range(cfg.num_layers):
            layers += [nn.Linear(width, cfg.hidden_size), nn.GELU()]
            width = cfg.hidden_size
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    def build_datasets(
        self, cfg: DataConfig, *, seed: int
    ) -> tuple[Dataset[Any], Dataset[Any] | None]:
        gen = torch.Generator().manual_seed(seed)
        weight = torch.randn(_FEATURES, 1, generator=gen)

        def make(n: int) -> TensorDataset:
            x = torch.randn(n, _FEATURES, generator=gen)
            return TensorDataset(x, x @ weight + 0.1 * torch.randn(n, 1, generator=gen))

        return make(1024), make(256)

    def build_criterion(self) -> Callable[..., torch.Tensor]:
        return F.mse_loss

    def count_targets(self, batch: Any) -> int:
        return int(batch[1].shape[0])

    def train_step(
        self, model: nn.Module, batch: Any, criterion: Callable[..., torch.Tensor]
    ) -> StepOutput:
        x, y = batch
        return StepOutput(loss=criterion(model(x), y))
