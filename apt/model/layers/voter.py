"""Voter: self-consistency voting at uncertain positions (evaluation and generation only).

At a position whose next-token entropy exceeds ``entropy_threshold`` the voter draws
``num_samples`` tokens from the model's distribution and returns the most frequent one (ties go
to the likelier token); elsewhere the caller's default choice (argmax, or a sample) stands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apt.core.config.model import VoterConfig
from apt.model.layers.switch import Switchable

__all__ = ["Voter", "entropy"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dim: (..., V) -> (...), float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class Voter(Switchable):
    """Majority vote of sampled tokens where the model is unsure.

    ``fired_count`` / ``seen_count`` count voted / decided positions since construction or
    :meth:`reset_counters` (runtime statistics, not saved with the weights).

    Args:
        cfg: the ``model.voter`` section.
    """

    entropy_threshold: torch.Tensor
    fired_count: torch.Tensor
    seen_count: torch.Tensor

    def __init__(self, cfg: VoterConfig) -> None:
        super().__init__(cfg.enabled, entropy_threshold=cfg.entropy_threshold)
        self.num_samples = cfg.num_samples
        self.register_buffer("fired_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("seen_count", torch.zeros((), dtype=torch.long), persistent=False)

    def fires(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (...) bool: positions whose entropy exceeds the threshold."""
        return entropy(logits) > self.entropy_threshold

    @property
    def fire_rate(self) -> float:
        """Voted positions / decided positions so far (0.0 before any)."""
        seen = int(self.seen_count)
        return int(self.fired_count) / seen if seen else 0.0

    def reset_counters(self) -> None:
        """Zero ``fired_count`` and ``seen_count``."""
        self.fired_count.zero_()
        self.seen_count.zero_()

    @torch.no_grad()
    def decide(
        self,
        logits: torch.Tensor,
        default: torch.Tensor,
        sample_logits: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace ``default`` tokens by a vote where the model is unsure.

        Args:
            logits: (..., V) raw logits; their entropy decides where to vote.
            default: (...) tokens to keep where no vote happens.
            sample_logits: (..., V) logits the votes sample from (temperature / top-k applied);
                ``logits`` when None.
            generator: random source of the samples.

        Returns:
            tokens (...) long and fired (...) bool.
        """
        fired = self.fires(logits)  # (...)
        tokens = default.clone()
        self.seen_count += fired.numel()
        self.fired_count += fired.sum()
        if bool(fired.any()):
            source = logits if sample_logits is None else sample_logits
            probs = F.softmax(source[fired].float(), dim=-1)  # (M, V)
            samples = torch.multinomial(
                probs, self.num_samples, replacement=True, generator=generator
            )  # (M, S)
            votes = (samples[:, :, None] == samples[:, None, :]).sum(-1)  # (M, S)
            # A probability (< 1) added to integer vote counts only breaks ties.
            score = votes.to(probs.dtype) + probs.gather(1, samples)
            winner = samples.gather(1, score.argmax(1, keepdim=True)).squeeze(1)  # (M,)
            tokens[fired] = winner
        return tokens, fired
