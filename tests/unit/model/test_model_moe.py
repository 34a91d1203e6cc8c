"""MoE feed-forward: capacity and overflow, aux losses, dense equivalence, sparse upcycling."""

from __future__ import annotations

import math

import pytest
import torch

from apt.core.config import MoEConfig
from apt.model.layers.mlp import SwiGLU
from apt.model.layers.moe import MoEFeedForward


def _layer(enabled: bool = True, **cfg: object) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(MoEConfig.model_validate({"num_experts": 4, **cfg}), dim=8, hidden=16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    if enabled:
        layer.enable()
    return layer


def _force_routing(layer: MoEFeedForward, order: list[int]) -> torch.Tensor:
    """Router weights that rank experts as ``order`` for every all-positive input; returns one."""
    with torch.no_grad():
        layer.router.weight.zero_()
        for rank, expert in enumerate(order):
            layer.router.weight[expert] = float(len(order) - rank)
    return torch.rand(1, 16, 8) + 0.5  # (B=1, T=16, D=8): N = 16 tokens


def test_capacity_follows_the_formula() -> None:
    layer = _layer(capacity_factor=1.25, top_k=2)
    assert layer.capacity(16) == math.ceil(1.25 * 16 * 2 / 4) == 10
    layer.set_scalar("capacity_factor", 0.1)
    assert layer.capacity(16) == 1


def test_top1_overflow_counts_on_a_forced_batch() -> None:
    layer = _layer(top_k=1, capacity_factor=1.0)  # capacity = ceil(16 * 1 / 4) = 4
    x = _force_routing(layer, [2, 0, 1, 3])  # everyone picks expert 2
    out, aux = layer(x)
    assert aux is not None
    assert aux.overflow_fraction.item() == pytest.approx(12 / 16)
    # The first 4 tokens got expert 2 (gate 1); the 12 others skip it and output exactly zero.
    e, x0 = layer.experts, x[0, :4]
    hidden = torch.nn.functional.silu(x0 @ e.gate_proj[2]) * (x0 @ e.up_proj[2])
    expected = hidden @ e.down_proj[2]
    torch.testing.assert_close(out[0, :4], expected)
    assert torch.equal(out[0, 4:], torch.zeros(12, 8))


def test_top2_overflow_counts_first_choices_first() -> None:
    layer = _layer(top_k=2, capacity_factor=1.0)  # capacity = ceil(16 * 2 / 4) = 8
    x = _force_routing(layer, [1, 3, 0, 2])  # first choice 1, second choice 3 for everyone
    out, aux = layer(x)
    assert aux is not None
    # 16 first choices for expert 1: 8 kept, 8 dropped; the same for expert 3: 16 of 32 dropped.
    assert aux.overflow_fraction.item() == pytest.approx(16 / 32)
    assert torch.equal(out[0, 8:], torch.zeros(8, 8))
    assert (out[0, :8].abs().sum(-1) > 0).all()
    # Eval mode is drop-free.
    layer.eval()
    _, aux = layer(x)
    assert aux is not None and aux.overflow_fraction.item() == 0.0


def test_disabled_layer_is_exactly_the_dense_mlp() -> None:
    layer = _layer(enabled=False)
    dense = SwiGLU(8, 16)
    dense.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if k.split(".")[0].endswith("_proj")}
    )
    x = torch.randn(2, 5, 8)
    out, aux = layer(x)
    assert aux is None
    assert torch.equal(out, dense(x))


def test_upcycled_layer_reproduces_the_dense_mlp() -> None:
    layer = _layer(enabled=False, top_k=2)
    x = torch.randn(2, 5, 8)
    dense_out, _ = layer(x)
    layer.enable()
    layer.eval()  # drop-free, so every token gets its full K gates
    moe_out, _ = layer(x)
    torch.testing.assert_close(moe_out, dense_out, rtol=1e-5, atol=1e-6)


def test_balance_loss_is_positive_and_falls_as_routing_balances() -> None:
    layer = _layer(top_k=2, aux_loss_weight=1.0, z_loss_weight=0.0)
    torch.manual_seed(1)
    x = torch.randn(1, 64, 8) + 2.0  # a shared offset: the random router favours a few experts
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        out, aux = layer(x)
        assert aux is not None
        losses.append(aux.balance_loss.item())
        opt.zero_grad()
        (aux.balance_loss + out.square().mean()).backward()
        opt.step()
    assert all(v > 0 for v in losses)
    assert losses[-1] < losses[0] - 0.1  # balanced top-2 routing gives 1.0
    assert losses[-1] < 1.1


def test_z_loss_is_weighted_logsumexp_squared() -> None:
    layer = _layer(z_loss_weight=0.5)
    x = torch.randn(1, 3, 8)
    _, aux = layer(x)
    assert aux is not None
    logits = x.reshape(3, 8) @ layer.router.weight.t()
    torch.testing.assert_close(aux.z_loss, 0.5 * torch.logsumexp(logits, -1).square().mean())


def test_upcycling_keeps_the_loss_of_a_trained_model(tiny_model, text_batches, train) -> None:
    batches = text_batches(8, 64, 32)
    model = tiny_model(moe={"num_experts": 4, "top_k": 2})
    train(model, batches[:30])
    x, y = batches[31]
    with torch.no_grad():
        before = model(x, y).lm_loss.item()
        model.controllable_modules()["moe"].enable()
        after = model(x, y)  # training mode: capacity applies
    assert after.lm_loss.item() == pytest.approx(before, rel=0.01)
    assert set(after.aux_losses) == {"moe_balance", "moe_z"}
    assert "moe_overflow_fraction" in after.stats
    model.eval()
    with torch.no_grad():
        assert model(x, y).lm_loss.item() == pytest.approx(before, rel=1e-4)


def test_upcycling_happens_once_and_survives_a_state_dict(tiny_model) -> None:
    model = tiny_model(moe={"num_experts": 4})
    keys = set(model.state_dict())
    group = model.controllable_modules()["moe"]
    group.enable()
    assert set(model.state_dict()) == keys
    layer = next(iter(model.moe_layers().values()))
    with torch.no_grad():
        layer.experts.gate_proj.add_(1.0)  # "training" moved the experts
        layer.gate_proj.weight.mul_(3.0)
    group.disable()
    group.enable()  # re-enabling must not upcycle again
    assert not torch.equal(layer.experts.gate_proj[0], layer.gate_proj.weight.t())

    fresh = tiny_model(seed=1, moe={"num_experts": 4})
    fresh.load_state_dict(model.state_dict())
    fresh_layer = next(iter(fresh.moe_layers().values()))
    assert fresh_layer.enabled
    fresh.controllable_modules()["moe"].enable()
    assert torch.equal(fresh_layer.experts.gate_proj, layer.experts.gate_proj)


def test_moe_built_enabled_keeps_random_experts(tiny_model) -> None:
    model = tiny_model(moe={"num_experts": 4, "enabled": True})
    layer = next(iter(model.moe_layers().values()))
    assert layer.enabled and bool(layer.experts_ready)
    assert not torch.equal(layer.experts.gate_proj[0], layer.experts.gate_proj[1])


def test_every_n_layers_places_moe_blocks(tiny_model) -> None:
    model = tiny_model(num_layers=4, moe={"num_experts": 4, "every_n_layers": 2})
    assert list(model.moe_layers()) == ["blocks.1.mlp", "blocks.3.mlp"]
