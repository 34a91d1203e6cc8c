"""FlexAttention (``model.document_attention: flex``, auto's choice on CUDA) keeps attention
inside documents as the dense mask does, forward and backward, eager and under torch.compile."""

from __future__ import annotations

import pytest
import torch

from apt.core.config.model import ModelConfig
from apt.model import APTModel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _model(kernel: str) -> APTModel:
    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=97,
        max_seq_len=512,
        document_attention=kernel,
    )
    return APTModel(config).cuda()


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (2, 300), device="cuda")
    cuts = [[0] * 70 + [1] * 130 + [2] * 100, [0] * 250 + [1] * 50]
    return ids, torch.tensor(cuts, device="cuda")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flex_equals_the_dense_mask_forward_and_backward(compiled: bool) -> None:
    ids, documents = _rows()
    out = {}
    for kernel in ("mask", "flex", "varlen"):
        model = _model(kernel)
        run = torch.compile(model) if compiled and kernel == "flex" else model
        loss = run(ids, targets=ids, document_ids=documents).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        out[kernel] = (loss.detach(), grads)
    for kernel in ("flex", "varlen"):
        torch.testing.assert_close(out[kernel][0], out["mask"][0], rtol=0, atol=1e-5)
        for name, grad in out["mask"][1].items():
            torch.testing.assert_close(out[kernel][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_takes_flex_on_cuda() -> None:
    from apt.model.layers.documents import document_layout, resolve_kernel

    _, documents = _rows()
    kernel = resolve_kernel("auto", documents.device, 0.0)
    layout = document_layout(documents, kernel)
    assert kernel == "flex" and layout.block_mask is not None
