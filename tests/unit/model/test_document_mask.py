"""A packed sequence with ``document_ids`` computes what each of its documents computes alone:
attention stays inside documents and positions restart at each document."""

from __future__ import annotations

import torch

from apt.core.config.model import ModelConfig
from apt.model import APTModel


def _model() -> APTModel:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=97)
    return APTModel(config).eval()


def test_packed_logits_equal_each_document_alone() -> None:
    model = _model()
    docs = [torch.randint(0, 97, (1, n)) for n in (5, 9, 2)]
    packed = torch.cat(docs, dim=1)  # (1, 16)
    ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids=ids).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        unmasked = model(packed).logits
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    # Without the ids the later documents see the earlier ones: the check can fail.
    assert (unmasked[:, 5:] - alone[:, 5:]).abs().max() > 1e-3


def test_a_batch_of_different_layouts_and_the_loss() -> None:
    model = _model()
    batch = torch.randint(0, 97, (2, 12))
    ids = torch.tensor([[0] * 4 + [1] * 8, [0] * 12])
    with torch.no_grad():
        out = model(batch, targets=batch, document_ids=ids)
        first = model(batch[:1, 4:]).logits
        second = model(batch[1:]).logits
    torch.testing.assert_close(out.logits[:1, 4:], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[1:], second, rtol=0, atol=1e-5)
    assert out.loss is not None and torch.isfinite(out.loss)
