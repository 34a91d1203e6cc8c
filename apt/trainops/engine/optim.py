"""Optimizers by ``training.optimizer.kind`` (registry :data:`OPTIMIZERS`): AdamW, Adam, SGD,
with parameter groups (no decay on biases, norms, embeddings) and fused kernels where the
parameters allow them. A new kind is a config section in ``apt.core.config.training`` and a
builder registered here."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from apt.core.config import OptimizerConfig
from apt.core.config.training import AdamConfig, AdamWConfig, SGDConfig
from apt.core.errors import ConfigError
from apt.core.registry import Registry

__all__ = ["OPTIMIZERS", "build_optimizer", "parameter_groups"]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Split trainable parameters into a decayed group (weight matrices) and one without decay.

    Only parameters that require a gradient are in a group: a frozen one (``finetune.freeze``,
    a LoRA base weight) gets no optimizer state and is never stepped.

    Biases, normalisation weights (any parameter with fewer than 2 dimensions) and embedding
    tables are not decayed: decay on them hurts and has no regularising purpose. A tied output
    head shares the embedding tensor and is therefore not decayed either.
    """
    no_decay_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or id(param) in no_decay_ids else decay).append(param)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _fused(model: nn.Module, requested: bool | None) -> bool | None:
    """Fused kernels when asked, or (None) when every parameter is on CUDA."""
    fused = all(p.is_cuda for p in model.parameters()) if requested is None else requested
    return fused or None


Groups = list[dict[str, object]]

#: Optimizer builders by ``training.optimizer.kind``: ``build(cfg, groups, lr, model)``, ``cfg``
#: the validated section of that kind.
OPTIMIZERS: Registry[Callable[..., Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("adamw")
def _adamw(
    cfg: AdamWConfig, groups: list[dict[str, object]], lr: float, model: nn.Module
) -> Optimizer:
    return AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=_fused(model, cfg.fused))


@OPTIMIZERS.register("adam")
def _adam(
    cfg: AdamConfig, groups: list[dict[str, object]], lr: float, model: nn.Module
) -> Optimizer:
    return Adam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=_fused(model, cfg.fused))


@OPTIMIZERS.register("sgd")
def _sgd(cfg: SGDConfig, groups: Groups, lr: float, model: nn.Module) -> Optimizer:
    return SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def build_optimizer(cfg: OptimizerConfig, *, model: nn.Module, learning_rate: float) -> Optimizer:
    """Build the optimizer ``cfg.kind`` names over ``model``'s parameter groups.

    Args:
        cfg: ``training.optimizer``.
        model: the model whose parameters are optimised (after the strategy wrapped it).
        learning_rate: the peak learning rate (the LR scheduler scales it).

    Raises:
        ConfigError: no optimizer is registered under ``cfg.kind``, or no parameter of
            ``model`` requires a gradient.
    """
    groups = parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError(
            "training.optimizer: no parameter of the model requires a gradient, so there is "
            "nothing to train. To fix: freeze fewer parameters (finetune.freeze), or set "
            "requires_grad on the parameters of the model you pass."
        )
    return OPTIMIZERS.get(cfg.kind)(cfg, groups, learning_rate, model)
