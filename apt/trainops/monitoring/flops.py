"""Model FLOPs utilization (MFU): the training FLOP/s a run achieves over the devices' peak.

``mfu = tokens/s x FLOPs per token / (peak FLOP/s of one device x devices)``. FLOPs per token of
training (forward and backward) are ``6 N + 12 L H T`` (N parameters, L layers, hidden size H,
sequence length T): 2 N for the forward matmuls, twice that for the backward, and the
attention scores and their backward (the PaLM paper's appendix B). The peak is the dense
(no sparsity) BF16 tensor-core figure of the vendor's datasheet; set ``monitoring.peak_flops``
for a device not in :data:`PEAK_FLOPS` (or a clock that differs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "PEAK_FLOPS",
    "flops_per_token",
    "lookup_peak_flops",
    "mfu",
    "multiplying_parameters",
    "peak_flops",
]

#: Dense BF16 peak FLOP/s of one device, by a part of the name ``torch.cuda.get_device_name``
#: reports (matched whole words, case-insensitive; the longest match wins, so ``H100 PCIe``
#: is not taken for ``H100``). Datasheets quote "with sparsity" figures twice as high.
PEAK_FLOPS: dict[str, float] = {
    # NVIDIA Blackwell: HGX B200 spec sheet, 4.5 PFLOPS BF16 with sparsity per GPU.
    "B200": 2.25e15,
    # NVIDIA Hopper. H200 datasheet: SXM 1,979 TFLOPS BF16 with sparsity, NVL 1,671.
    "H200": 989.5e12,
    "H200 NVL": 835.5e12,
    # H100 datasheet: SXM 1,979 TFLOPS with sparsity, PCIe 1,513, NVL 1,671; GH200
    # datasheet: the same Hopper GPU as H100 SXM.
    "H100": 989.5e12,
    "H100 SXM": 989.5e12,
    "H100 PCIE": 756.5e12,
    "H100 NVL": 835.5e12,
    "GH200": 989.5e12,
    # NVIDIA Ampere. A100 datasheet: 312 TFLOPS BF16 (SXM and PCIe). A10 datasheet: 125
    # TFLOPS BF16; NVIDIA publishes no sheet for AWS's A10G, taken as an A10 here.
    "A100": 312e12,
    "A10": 125e12,
    "A10G": 125e12,
    # NVIDIA Ada. L40S datasheet: 362.05 TFLOPS BF16; L40: 181.05; L4: 242 with sparsity.
    # Ada architecture whitepaper: RTX 4090, 165.2 TFLOPS BF16 with FP32 accumulate.
    "L40S": 362.05e12,
    "L40": 181.05e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
    # NVIDIA Volta has no BF16: V100 datasheet FP16 tensor figures (SXM2 125, PCIe 112).
    "V100": 125e12,
    "V100 PCIE": 112e12,
    # AMD Instinct datasheets: MI300X and MI325X 1,307.4 TFLOPS BF16 dense; MI250X 383.
    "MI300X": 1307.4e12,
    "MI325X": 1307.4e12,
    "MI250X": 383e12,
}


def _words(name: str) -> list[str]:
    return name.upper().replace("-", " ").replace("_", " ").split()


def lookup_peak_flops(device_name: str) -> float | None:
    """The :data:`PEAK_FLOPS` entry of a device name (``"NVIDIA H100 PCIe"``), or None.

    >>> lookup_peak_flops("NVIDIA A100-SXM4-80GB")
    312000000000000.0
    """
    words = _words(device_name)
    best: tuple[int, float] | None = None
    for key, flops in PEAK_FLOPS.items():
        key_words = _words(key)
        n = len(key_words)
        found = any(words[i : i + n] == key_words for i in range(len(words) - n + 1))
        if found and (best is None or n > best[0]):
            best = (n, flops)
    return best[1] if best else None


def peak_flops(device: torch.device | str, override: float | None = None) -> float | None:
    """The peak FLOP/s of one ``device`` for the MFU estimate.

    Args:
        device: where the run trains.
        override: ``monitoring.peak_flops``; returned when set.

    Returns:
        ``override``; else the table's figure for a CUDA (or ROCm) device it knows; else None
        (CPU, MPS, an unknown GPU): no MFU is reported.
    """
    if override is not None:
        return float(override)
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device))


def flops_per_token(
    num_params: int,
    *,
    trainable_params: int | None = None,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    seq_len: int | None = None,
) -> float:
    """Training FLOPs per token: ``6 N``, plus ``12 L H T`` for attention when the shape is
    known (all three of ``num_layers``, ``hidden_size``, ``seq_len``).

    With frozen parameters (``trainable_params`` N_t < N) the count is ``4 N + 2 N_t``: every
    matrix product runs forward (2 N) and passes gradients to its input (2 N), but only
    those that train compute their weight gradient (2 N_t). Layers before the first that
    trains need no input gradient either, so a frozen prefix is counted above what it costs.

    Args:
        num_params: N, the parameters the matmuls use (commonly without embedding tables).
        trainable_params: those of them that train; None: all of them.

    Raises:
        ValueError: a negative count, or more trainable parameters than parameters.

    >>> flops_per_token(1000, num_layers=2, hidden_size=8, seq_len=16)
    9072.0
    >>> flops_per_token(1000, trainable_params=100)
    4200.0
    """
    trainable = num_params if trainable_params is None else trainable_params
    shape = (num_layers, hidden_size, seq_len)
    if num_params < 0 or trainable < 0 or any(v is not None and v < 0 for v in shape):
        raise ValueError(f"flops_per_token: counts must not be negative, got {num_params}, {shape}")
    if trainable > num_params:
        raise ValueError(
            f"flops_per_token: {trainable} trainable parameters of {num_params} in all"
        )
    flops = 4.0 * num_params + 2.0 * trainable
    if num_layers is not None and hidden_size is not None and seq_len is not None:
        flops += 12.0 * num_layers * hidden_size * seq_len
    return flops


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, world_size: int) -> float:
    """Model FLOPs utilization, a fraction (0.4 is 40 %).

    Args:
        tokens_per_second: tokens trained per second by the whole run (every rank).
        flops_per_token: :func:`flops_per_token` of the model.
        peak: peak FLOP/s of one device (:func:`peak_flops`).
        world_size: the number of devices.

    Raises:
        ValueError: ``peak`` not positive or ``world_size`` below 1.
    """
    if peak <= 0 or world_size < 1:
        raise ValueError(f"mfu: needs peak > 0 and world_size >= 1, got {peak}, {world_size}")
    return tokens_per_second * flops_per_token / (peak * world_size)


def multiplying_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """The parameters of ``model`` that take part in matrix products: every one but an
    embedding table that is only looked up (a table tied to the output head multiplies there,
    so it counts once); the ``N`` of :func:`flops_per_token` (with ``trainable_only``: those
    that train, its ``N_t``)."""
    from torch import nn

    multiplying = {
        id(p)
        for module in model.modules()
        if not isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    lookups = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, nn.Embedding) and id(module.weight) not in multiplying
    }
    return sum(
        p.numel()
        for p in model.parameters()
        if id(p) not in lookups and (p.requires_grad or not trainable_only)
    )
