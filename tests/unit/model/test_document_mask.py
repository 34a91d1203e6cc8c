"""A packed sequence with ``document_ids`` computes what each of its documents computes alone:
attention stays inside documents and positions restart at each document, whichever kernel
(``model.document_attention``) attends."""

from __future__ import annotations

import pytest
import torch

from apt.core.config.model import ModelConfig
from apt.core.errors import ConfigError
from apt.model import APTModel
from apt.model.layers.documents import document_layout, resolve_kernel

#: The kernels that run on the CPU; flex is checked on CUDA (tests/.../test_flex_gpu.py).
CPU_KERNELS = ["mask", "varlen"]


def _model(kernel: str = "auto", dropout: float = 0.0) -> APTModel:
    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=97,
        dropout=dropout,
        document_attention=kernel,
    )
    return APTModel(config).eval()


def _packed() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    docs = [torch.randint(0, 97, (1, n)) for n in (5, 9, 2)]
    packed = torch.cat(docs, dim=1)  # (1, 16)
    ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    return docs, packed, ids


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_packed_logits_equal_each_document_alone(kernel: str) -> None:
    model = _model(kernel)
    docs, packed, ids = _packed()
    with torch.no_grad():
        together = model(packed, document_ids=ids).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        unmasked = model(packed).logits
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    # Without the ids the later documents see the earlier ones: the check can fail.
    assert (unmasked[:, 5:] - alone[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_a_batch_of_different_layouts_and_the_loss(kernel: str) -> None:
    model = _model(kernel)
    batch = torch.randint(0, 97, (2, 12))
    ids = torch.tensor([[0] * 4 + [1] * 8, [0] * 12])
    with torch.no_grad():
        out = model(batch, targets=batch, document_ids=ids)
        first = model(batch[:1, 4:]).logits
        second = model(batch[1:]).logits
    torch.testing.assert_close(out.logits[:1, 4:], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[1:], second, rtol=0, atol=1e-5)
    assert out.loss is not None and torch.isfinite(out.loss)


def test_the_kernels_give_the_same_gradients() -> None:
    """varlen's per-document SDPA and the dense mask are the same attention, backward too."""
    _, packed, ids = _packed()
    grads = {}
    for kernel in CPU_KERNELS:
        model = _model(kernel).train()
        model(packed, targets=packed, document_ids=ids).loss.backward()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["mask"].keys() == grads["varlen"].keys() and len(grads["mask"]) > 0
    for name, grad in grads["mask"].items():
        torch.testing.assert_close(grads["varlen"][name], grad, rtol=0, atol=1e-6, msg=name)


def test_varlen_reads_each_rows_document_bounds() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    layout = document_layout(ids, "varlen")
    assert layout.bounds == (((0, 2), (2, 5), (5, 6)), ((0, 6),))
    assert layout.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]


def test_auto_takes_flex_on_cuda_and_varlen_elsewhere() -> None:
    assert resolve_kernel("auto", torch.device("cpu"), 0.0) == "varlen"
    assert resolve_kernel("auto", torch.device("cuda"), 0.0) == "flex"
    assert resolve_kernel("auto", torch.device("cuda"), 0.1) == "varlen"  # flex has no dropout
    assert resolve_kernel("mask", torch.device("cuda"), 0.0) == "mask"


def test_flex_refuses_to_train_on_the_cpu_with_the_fix() -> None:
    model = _model("flex").train()
    _, packed, ids = _packed()
    with pytest.raises(ConfigError, match=r"document_attention: flex cannot train on the CPU"):
        model(packed, targets=packed, document_ids=ids)


def test_flex_refuses_attention_dropout() -> None:
    model = _model("flex", dropout=0.1).train()
    _, packed, ids = _packed()
    with pytest.raises(ConfigError, match=r"flex has no attention dropout"):
        model(packed, targets=packed, document_ids=ids)
