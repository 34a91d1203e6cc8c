"""Optimizer factory: AdamW, Adam, SGD with parameter groups (no decay on biases, norms,
embeddings) and fused kernels where the parameters allow them."""

from __future__ import annotations

from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from apt.core.config import OptimizerConfig
from apt.core.config.training import AdamConfig, AdamWConfig, SGDConfig

__all__ = ["build_optimizer", "parameter_groups"]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Split trainable parameters into a decayed group (weight matrices) and one without decay.

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


def _fused_ok(model: nn.Module, requested: bool | None) -> bool:
    on_cuda = all(p.is_cuda for p in model.parameters())
    return on_cuda if requested is None else requested


def build_optimizer(cfg: OptimizerConfig, *, model: nn.Module, learning_rate: float) -> Optimizer:
    """Build the optimizer named by ``cfg.kind`` over ``model``'s parameter groups.

    Args:
        cfg: ``training.optimizer``.
        model: the model whose parameters are optimised (after the strategy wrapped it).
        learning_rate: the peak learning rate (the LR scheduler scales it).
    """
    groups = parameter_groups(model, cfg.weight_decay)
    if isinstance(cfg, AdamConfig):
        return Adam(
            groups,
            lr=learning_rate,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=_fused_ok(model, cfg.fused) or None,
        )
    if isinstance(cfg, AdamWConfig):
        return AdamW(
            groups,
            lr=learning_rate,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=_fused_ok(model, cfg.fused) or None,
        )
    if isinstance(cfg, SGDConfig):
        return SGD(groups, lr=learning_rate, momentum=cfg.momentum, nesterov=cfg.nesterov)
    raise AssertionError(f"unhandled optimizer config {type(cfg).__name__}")
