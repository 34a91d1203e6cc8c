"""Align: an auxiliary KL loss that holds the model near a frozen copy of itself.

The reference copy lives in persistent buffers (``ref__<parameter name with '.' -> '__'>``),
allocated whenever ``model.align`` is configured. So the optimizer never sees it (buffers are
not parameters), yet it travels with ``state_dict()`` under the same keys whether align is on
or off, and a resumed run continues against exactly the same reference.

The copy may cover only some parameters (``finetune.align`` copies those that train): the
reference forward then uses every other parameter as it is, which is the reference exactly
when those never change (frozen ones).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from apt.core.config.model import AlignConfig
from apt.model.layers.switch import Switchable

__all__ = ["AlignLoss", "kl_divergence"]

_PREFIX = "ref__"


def kl_divergence(
    logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over positions of KL(p || q), p = softmax(logits), q = softmax(ref_logits).

    Args:
        logits: (..., V) of the model being trained.
        ref_logits: (..., V) of the reference.
        mask: (...) bool, positions to average over (all when None).

    Returns:
        A float32 scalar.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (...)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


class AlignLoss(Switchable):
    """Holds the frozen reference and the ``loss_weight``; the model runs the reference forward.

    The reference is taken on every off -> on switch (by the model, which owns the parameters:
    see ``APTModel.controllable_modules()``), never on load.

    Args:
        cfg: the ``model.align`` section.
        params: (name, parameter) of the model parameters the reference copies (all of them
            for ``model.align``; those that train for ``finetune.align``).
    """

    has_reference: torch.Tensor
    loss_weight: torch.Tensor

    def __init__(self, cfg: AlignConfig, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().__init__(cfg.enabled, loss_weight=cfg.loss_weight)
        self._names: dict[str, str] = {}  # parameter name -> buffer name
        for name, param in params:
            buffer_name = _PREFIX + name.replace(".", "__")
            self._names[name] = buffer_name
            self.register_buffer(buffer_name, torch.zeros_like(param, requires_grad=False))
        self.register_buffer("has_reference", torch.tensor(False))
        self._has_reference = False

    @property
    def needs_reference(self) -> bool:
        """On, but no reference taken yet."""
        return self.enabled and not self._has_reference

    def reference(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its frozen reference tensor, for every parameter copied (the
        reference forward uses any other parameter as it is)."""
        return {name: getattr(self, buffer) for name, buffer in self._names.items()}

    @torch.no_grad()
    def take_reference(self, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the current parameters into the reference buffers."""
        for name, param in params:
            if name in self._names:
                getattr(self, self._names[name]).copy_(param.detach())
        self.has_reference.fill_(True)
        self._has_reference = True

    def _on_disable(self) -> None:
        # The next switch-on takes a fresh reference.
        self.has_reference.fill_(False)
        self._has_reference = False

    def _sync_from_buffers(self) -> None:
        super()._sync_from_buffers()
        self._has_reference = bool(self.has_reference)
