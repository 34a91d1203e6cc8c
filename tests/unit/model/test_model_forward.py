"""APTModel forward: shapes, losses, init, determinism, compile-friendliness."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from apt.core.config import ModelConfig
from apt.model import APTModel, ModelOutput, build_model

Factory = Callable[..., APTModel]


def test_forward_shapes_and_loss_against_aligned_targets(tiny_model: Factory) -> None:
    model = tiny_model()
    x = torch.randint(0, 256, (3, 10))
    y = torch.randint(0, 256, (3, 10))
    y[0, :4] = -100
    out = model(x, y)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (3, 10, 256)
    # No shift inside the model: position t is scored against targets[t]; -100 is ignored.
    keep = y != -100
    expected = F.cross_entropy(out.logits[keep].float(), y[keep])
    torch.testing.assert_close(out.lm_loss, expected)
    assert out.lm_loss.dtype == torch.float32
    assert torch.equal(out.loss, out.lm_loss)  # a dense model has no aux losses
    assert out.aux_losses == {} and out.stats == {}


def test_a_loss_only_forward_gives_the_same_loss_and_gradients_without_logits(
    tiny_model: Factory,
) -> None:
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    full, lean = tiny_model(), tiny_model()
    with_logits = full(x, y)
    without = lean(x, y, return_logits=False)
    assert without.logits is None and with_logits.logits is not None
    assert torch.equal(without.loss, with_logits.loss)
    with_logits.loss.backward()
    without.loss.backward()
    for (name, a), b in zip(full.named_parameters(), lean.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    # without targets there is no loss to return instead: the logits always come back
    assert lean(x, return_logits=False).logits.shape == (2, 8, 256)


def test_no_targets_no_loss(tiny_model: Factory) -> None:
    out = tiny_model()(torch.randint(0, 256, (2, 5)))
    assert out.loss is None and out.lm_loss is None


def test_logits_are_causal(tiny_model: Factory) -> None:
    model = tiny_model(num_kv_heads=2).eval()
    x = torch.randint(0, 256, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % 256
    a, b = model(x).logits, model(x2).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_construction_is_deterministic_given_the_seed(tiny_model: Factory) -> None:
    a, b, c = tiny_model(seed=3), tiny_model(seed=3), tiny_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.q_proj.weight"], sc["blocks.0.attn.q_proj.weight"])


def test_init_std_and_scaled_residual_projections(tiny_config: Callable[..., ModelConfig]) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=256, num_layers=8, init_std=0.05)
    model = APTModel(cfg)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    resid = 0.05 / math.sqrt(2 * 8)
    assert model.blocks[3].attn.o_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert model.blocks[3].mlp.down_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_tied_and_untied_heads(tiny_model: Factory) -> None:
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 256 * 64
    assert tied.num_parameters(non_embedding=True) == tied.num_parameters() - 256 * 64


def test_mlp_width_and_gqa_shapes(tiny_model: Factory) -> None:
    model = tiny_model(num_kv_heads=1)
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (16, 64)  # one 16-wide key head
    assert model.blocks[0].mlp.gate_proj.weight.shape == (192, 64)  # 8/3 * 64 -> 192 (x64)
    assert model(torch.randint(0, 256, (2, 7))).logits.shape == (2, 7, 256)


def test_dropout_only_while_training(tiny_model: Factory) -> None:
    model = tiny_model(dropout=0.5)
    x = torch.randint(0, 256, (2, 8))
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_too_long_input_names_max_seq_len(tiny_model: Factory) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


def test_build_model_takes_the_model_section(tiny_config: Callable[..., ModelConfig]) -> None:
    assert isinstance(build_model(tiny_config()), APTModel)
    with pytest.raises(TypeError, match=r"cfg\.model"):
        build_model({"hidden_size": 64})  # type: ignore[arg-type]


def test_bf16_autocast_keeps_the_loss_in_fp32(tiny_model: Factory) -> None:
    model = tiny_model(moe={"num_experts": 4, "enabled": True})
    x = torch.randint(0, 256, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, x)
    assert out.logits.dtype == torch.bfloat16
    assert out.lm_loss.dtype == torch.float32
    out.loss.backward()


def test_bfloat16_weights_keep_exact_rope_and_fp32_scalars(tiny_model: Factory) -> None:
    model = tiny_model(moe={"num_experts": 4}, voter={})
    cos = model.rope.cos.clone()
    model.set_scheduled("router.temperature", 0.7)
    model.bfloat16()
    assert model.rope.cos.dtype == torch.float32 and torch.equal(model.rope.cos, cos)
    layer = model.blocks[0].mlp
    assert layer.router_temperature.dtype == torch.float32
    assert layer.router_temperature.item() == pytest.approx(0.7, abs=1e-7)
    assert model(torch.randint(0, 256, (1, 4))).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("extra", [{}, {"moe": {"num_experts": 4, "enabled": True}}])
def test_forward_traces_without_graph_breaks(tiny_model: Factory, extra: dict) -> None:
    torch._dynamo.reset()
    model = tiny_model(num_kv_heads=2, **extra)
    x = torch.randint(0, 256, (2, 16))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
