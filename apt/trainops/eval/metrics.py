"""Evaluation metrics from additive sums: loss, perplexity, accuracy, entropy, bits per byte.

Every metric is a ratio of two sums over the targets scored (``loss`` = summed cross-entropy /
targets, ``bpb`` = summed cross-entropy / ln 2 / target bytes), so sums taken per batch and per
rank add up to the exact metric of the whole set: batches and ranks are summed first, divided
once at the end. One collective carries every sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from apt.core.errors import ConfigError
from apt.core.registry import closest_names
from apt.trainops.data.tokenizers import count_token_bytes
from apt.trainops.distributed import in_process_group

__all__ = [
    "METRICS",
    "Reduce",
    "all_ranks_sum",
    "check_metric_names",
    "compute_metrics",
    "reduce_sums",
    "summarize",
]

#: The metrics one can ask for by name, in their default order.
METRICS = ("loss", "perplexity", "accuracy", "entropy", "bpb")

#: Sums a tensor over ranks (returns the sum; may work in place).
Reduce = Callable[[torch.Tensor], torch.Tensor]

#: exp() of a larger loss overflows float64; the perplexity of a model that bad is moot.
_MAX_LOG_PERPLEXITY = 50.0


def check_metric_names(names: Sequence[str], *, where: str) -> tuple[str, ...]:
    """``names`` without repeats, in their order, each one of :data:`METRICS`.

    Raises:
        ConfigError: an unknown name, with the nearest valid one and the list of valid names.
    """
    if isinstance(names, str):  # metrics="loss" would otherwise be read letter by letter
        names = [names]
    for name in names:
        if name not in METRICS:
            near = closest_names(str(name), METRICS)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"{where}: unknown metric {name!r}.{hint} Valid metrics: {', '.join(METRICS)}"
            )
    return tuple(dict.fromkeys(names))


def all_ranks_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every rank of the default process group (in place)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_sums(
    sums: Mapping[str, torch.Tensor], *, device: torch.device, reduce: Reduce | None
) -> dict[str, float]:
    """Every sum added over the ranks in one collective, as floats.

    Args:
        sums: scalar tensors by name (the same names, in any order, on every rank).
        device: where the packed tensor goes for the collective (NCCL needs the GPU).
        reduce: the sum over ranks; None: :func:`all_ranks_sum` inside a process group, no
            collective outside one.
    """
    names = sorted(sums)
    packed = torch.stack([sums[k].detach().to("cpu", torch.float64) for k in names]).to(device)
    if reduce is None and in_process_group():
        reduce = all_ranks_sum
    if reduce is not None:
        packed = reduce(packed)
    return dict(zip(names, packed.tolist(), strict=True))


def summarize(
    sums: Mapping[str, float],
    names: Sequence[str] | None = None,
    *,
    perplexity: bool = True,
    prefix: str = "",
) -> dict[str, float]:
    """Metrics from summed totals.

    Args:
        sums: ``loss`` (summed loss over the targets, in nats for a cross-entropy), ``targets``
            (how many), optionally ``bytes`` (UTF-8 bytes of the targets) and any other total
            (``accuracy``: correct predictions, ``entropy``: summed entropy, ...), reported as
            total / targets.
        names: the metrics wanted, in order; None: ``loss``, ``perplexity`` (when
            ``perplexity``), ``bpb`` (when ``bytes`` was summed), then every other total by name.
        perplexity: the loss is a cross-entropy, so exp(loss) means something.
        prefix: put before every name (``val_``).

    Returns:
        ``{prefix + name: value}``; empty when no target was scored.

    Raises:
        ConfigError: a metric in ``names`` that the sums cannot give (no such total).
    """
    sums = dict(sums)
    targets = sums.pop("targets", 0.0)
    if targets == 0:
        return {}
    loss_sum, byte_sum = sums.pop("loss"), sums.pop("bytes", None)
    if names is None:
        names = ["loss", *(["perplexity"] if perplexity else [])]
        names += [*(["bpb"] if byte_sum is not None else []), *sorted(sums)]
    loss = loss_sum / targets
    out: dict[str, float] = {}
    for name in names:
        if name == "loss":
            value = loss
        elif name == "perplexity":
            value = math.exp(min(loss, _MAX_LOG_PERPLEXITY))
        elif name == "bpb" and byte_sum is not None:
            # Divided in this order so that, with one byte per token, bpb == loss / ln 2 exactly.
            value = loss_sum / byte_sum / math.log(2) if byte_sum else math.nan
        elif name in sums:
            value = sums[name] / targets
        else:
            have = ", ".join(["loss", *sorted(sums)])
            raise ConfigError(
                f"metric {name!r} cannot be computed: the task reports no {name!r} total "
                f"(it reports {have}); ask for another metric"
            )
        out[prefix + name] = value
    return out


def compute_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    metrics: Sequence[str] | None = None,
    *,
    ignore_index: int = -100,
    token_bytes: torch.Tensor | None = None,
    reduce: Reduce | None = None,
) -> dict[str, float]:
    """Metrics of next-token predictions, for your own evaluation loop.

    ``labels[i]`` is the target of ``logits[i]`` (already shifted: no shift happens here).
    Everything is computed from sums over the targets that are not ``ignore_index``, and inside a
    ``torch.distributed`` process group the sums are added over the ranks first, so every rank
    gets the metrics of all ranks' targets together.

    Args:
        logits: ``(..., V)`` scores, e.g. ``(B, T, V)``; one batch, or several concatenated.
        labels: ``(...)`` target ids, the shape of ``logits`` without its last dimension.
        metrics: names from :data:`METRICS`, in the order wanted; None: loss, perplexity,
            accuracy, entropy (and bpb when ``token_bytes`` is given).
        ignore_index: the label of positions that are not scored (padding).
        token_bytes: UTF-8 bytes of each id (:func:`~apt.trainops.data.tokenizers.
            token_byte_lengths`); needed for ``bpb``.
        reduce: the sum over ranks; None: an all-reduce inside a process group, nothing outside
            one. Pass ``lambda t: t`` when only this rank evaluates.

    Returns:
        ``{name: value}``: ``loss`` (mean cross-entropy, nats), ``perplexity`` (exp of it),
        ``accuracy`` (share of targets that are the argmax), ``entropy`` (mean predictive
        entropy, nats), ``bpb`` (cross-entropy in bits per UTF-8 byte of the targets). Empty when
        no target is scored.

    Raises:
        ConfigError: an unknown metric name, or ``bpb`` without ``token_bytes``.
        ValueError: ``labels`` does not have the shape of ``logits`` without its last dimension.
    """
    names = check_metric_names(
        metrics
        if metrics is not None
        else METRICS[:4] + (("bpb",) if token_bytes is not None else ()),
        where="compute_metrics",
    )
    if "bpb" in names and token_bytes is None:
        raise ConfigError(
            "compute_metrics: metric 'bpb' needs token_bytes=token_byte_lengths(tokenizer) "
            "(apt.trainops.data.tokenizers)"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"compute_metrics: labels of shape {tuple(labels.shape)} do not match logits of "
            f"shape {tuple(logits.shape)} (expected labels {tuple(logits.shape[:-1])})"
        )
    flat = labels.reshape(-1)
    scored = flat != ignore_index  # (N,)
    targets = flat[scored]  # (n,)
    logp = F.log_softmax(logits.detach().reshape(-1, logits.size(-1))[scored].float(), dim=-1)
    sums = {
        "loss": -logp.gather(1, targets[:, None]).sum(dtype=torch.float64),
        "targets": torch.tensor(float(targets.numel()), dtype=torch.float64),
    }
    if "accuracy" in names:
        sums["accuracy"] = (logp.argmax(-1) == targets).sum()
    if "entropy" in names:
        sums["entropy"] = -(logp.exp() * logp).sum(dtype=torch.float64)
    if "bpb" in names and token_bytes is not None:
        sums["bytes"] = torch.tensor(float(count_token_bytes(targets.cpu(), token_bytes)))
    totals = reduce_sums(sums, device=logits.device, reduce=reduce)
    return summarize(totals, names)
