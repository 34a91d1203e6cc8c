"""Switchable modules: names match the config, state round-trips, align and voter behave."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from apt.core.config import ModelConfig
from apt.core.errors import ConfigError
from apt.model import APTModel, Controllable

Factory = Callable[..., APTModel]

SECTIONS = {"moe": {"num_experts": 4}, "align": {}, "voter": {}}


@pytest.mark.parametrize(
    "sections",
    [[], ["moe"], ["align"], ["voter"], ["moe", "voter"], ["moe", "align", "voter"]],
)
def test_names_equal_the_configs(tiny_model: Factory, sections: list[str]) -> None:
    model = tiny_model(**{s: SECTIONS[s] for s in sections})
    cfg = model.config
    assert list(model.controllable_modules()) == cfg.controllable_modules()
    assert model.schedulable_attributes() == cfg.schedulable_attributes()
    for group in model.controllable_modules().values():
        assert isinstance(group, Controllable)


def test_state_dict_keys_are_stable_across_switches(tiny_model: Factory) -> None:
    model = tiny_model(**SECTIONS)
    keys = set(model.state_dict())
    params = {id(p) for p in model.parameters()}
    for name, group in model.controllable_modules().items():
        group.enable()
        assert group.enabled, name
        assert set(model.state_dict()) == keys, name
        group.disable()
        assert not group.enabled
        assert set(model.state_dict()) == keys, name
    assert {id(p) for p in model.parameters()} == params


def test_enabled_flags_and_values_round_trip_through_state_dict(tiny_model: Factory) -> None:
    model = tiny_model(**SECTIONS)
    groups = model.controllable_modules()
    groups["moe"].enable()
    groups["voter"].enable()
    model.set_scheduled("moe.capacity_factor", 1.5)
    model.set_scheduled("voter.entropy_threshold", 0.25)
    other = tiny_model(seed=1, **SECTIONS)
    other.load_state_dict(model.state_dict())
    got = other.controllable_modules()
    assert got["moe"].enabled and got["router"].enabled and got["voter"].enabled
    assert not got["align"].enabled
    assert other.get_scheduled("moe.capacity_factor") == 1.5
    assert all(layer.capacity(16) == 12 for layer in other.moe_layers().values())
    assert other.get_scheduled("voter.entropy_threshold") == 0.25


def test_scheduled_values_fan_out_and_aliases_resolve(tiny_model: Factory) -> None:
    model = tiny_model(num_layers=3, **SECTIONS)
    router = model.controllable_modules()["router"]
    router.temperature = 0.5
    assert router.temperature == 0.5
    assert [layer.router_temperature.item() for layer in model.moe_layers().values()] == [0.5] * 3
    model.set_scheduled("align_weight", 0.3)  # alias of align.loss_weight
    assert model.get_scheduled("align.loss_weight") == pytest.approx(0.3)
    with pytest.raises(ConfigError, match=r"Valid: router\.temperature"):
        model.set_scheduled("router.temprature", 1.0)
    with pytest.raises(AttributeError, match="valid: temperature"):
        router.capacity = 2.0
    with pytest.raises(ConfigError, match="none"):
        tiny_model().get_scheduled("router.temperature")


def test_aux_losses_come_only_through_the_output(tiny_model: Factory) -> None:
    model = tiny_model(moe={"num_experts": 4, "aux_loss_weight": 0.5})
    x = torch.randint(0, 256, (2, 16))
    assert model(x, x).aux_losses == {}
    model.controllable_modules()["moe"].enable()
    out = model(x, x)
    assert set(out.aux_losses) == {"moe_balance", "moe_z"}
    total = out.lm_loss + out.aux_losses["moe_balance"] + out.aux_losses["moe_z"]
    torch.testing.assert_close(out.loss, total)
    assert out.aux_losses["moe_balance"].item() >= 0.5 * 0.99  # weight * (>= ~1)
    assert not out.stats["moe_overflow_fraction"].requires_grad


def test_align_reference_is_frozen_and_outside_parameters(
    tiny_model: Factory, text_batches: Callable, train: Callable
) -> None:
    model = tiny_model(align={"loss_weight": 1.0})
    n_params = model.num_parameters()
    assert all(not name.startswith("align.") for name, _ in model.named_parameters())
    align = model.controllable_modules()["align"]
    align.enable()
    assert model.num_parameters() == n_params
    x, y = text_batches(4, 32, 1)[0]
    out = model(x, y)
    assert out.aux_losses["align_kl"].item() == pytest.approx(0.0, abs=1e-6)
    ref = {k: v.clone() for k, v in model.align.reference().items()}
    train(model, text_batches(4, 32, 5), lr=1e-2)
    assert all(torch.equal(ref[k], v) for k, v in model.align.reference().items())
    out = model(x, y)
    assert out.aux_losses["align_kl"].item() > 1e-4
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["align_kl"])
    # The gradient reaches the live weights only.
    out.aux_losses["align_kl"].backward()
    assert model.embed_tokens.weight.grad is not None
    assert all(not b.requires_grad for b in model.align.reference().values())


def test_align_reference_resumes_exactly_and_is_not_retaken(
    tiny_model: Factory, text_batches: Callable, train: Callable
) -> None:
    model = tiny_model(align={})
    model.controllable_modules()["align"].enable()
    train(model, text_batches(4, 32, 3), lr=1e-2)
    resumed = tiny_model(seed=9, align={})
    resumed.load_state_dict(model.state_dict())
    resumed.controllable_modules()["align"].enable()  # a schedule re-applying its switch: no-op
    x, y = text_batches(4, 32, 1)[0]
    assert torch.equal(model(x, y).loss, resumed(x, y).loss)
    # A re-enable after a disable takes a fresh reference.
    model.controllable_modules()["align"].disable()
    model.controllable_modules()["align"].enable()
    assert model(x, y).aux_losses["align_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_align_enabled_before_moe_sees_upcycled_reference_experts(tiny_model: Factory) -> None:
    model = tiny_model(moe={"num_experts": 4}, align={})
    groups = model.controllable_modules()
    groups["align"].enable()
    groups["moe"].enable()
    model.eval()  # drop-free routing: upcycled experts reproduce the dense MLP exactly
    x = torch.randint(0, 256, (2, 16))
    assert model(x, x).aux_losses["align_kl"].item() == pytest.approx(0.0, abs=1e-5)


def test_voter_votes_only_at_uncertain_positions(tiny_model: Factory) -> None:
    model = tiny_model(voter={"entropy_threshold": 1.0, "num_samples": 64})
    logits = torch.full((2, 3, 256), -30.0)
    logits[..., 7] = 30.0  # certain positions: token 7
    logits[1, 2] = 0.0
    logits[1, 2, :2] = 5.0  # uncertain, but tokens 0 and 1 hold nearly all the mass
    tokens, fired = model.predict_tokens(logits)
    assert not fired.any()  # off by default: argmax
    assert model.controllable_modules()["voter"].enabled is False
    model.controllable_modules()["voter"].enable()
    tokens, fired = model.predict_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert fired.tolist() == [[False] * 3, [False, False, True]]
    assert (tokens[~fired] == 7).all() and tokens[1, 2].item() in (0, 1)
    voter = model.voter
    assert (int(voter.fired_count), int(voter.seen_count)) == (1, 6)
    assert voter.fire_rate == pytest.approx(1 / 6)
    model.eval()
    stats = model(torch.randint(0, 256, (1, 8))).stats
    assert 0.0 <= stats["voter_fired"].item() <= 1.0
    model.train()
    assert "voter_fired" not in model(torch.randint(0, 256, (1, 8))).stats


def test_voter_majority_beats_a_single_sample() -> None:
    torch.manual_seed(0)
    model = APTModel(
        ModelConfig(
            hidden_size=32,
            num_layers=1,
            voter={"enabled": True, "entropy_threshold": 0.1, "num_samples": 15},
        )
    )
    probs = torch.tensor([0.6, 0.4] + [0.0] * 254)
    logits = probs.clamp_min(1e-9).log().expand(2000, 256)
    tokens, fired = model.predict_tokens(logits, generator=torch.Generator().manual_seed(1))
    assert fired.all()
    # Majority of 15 draws from (0.6, 0.4) picks token 0 about 79% of the time.
    assert (tokens == 0).float().mean().item() == pytest.approx(0.79, abs=0.04)


def test_voter_in_generation(tiny_model: Factory) -> None:
    model = tiny_model(voter={"enabled": True, "entropy_threshold": 0.0})
    out = model.generate(
        torch.tensor([1, 2, 3]), 5, temperature=0, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (8,)
    assert int(model.voter.fired_count) == 5


def test_align_enabled_directly_takes_its_reference_at_the_next_forward(
    tiny_model: Factory,
) -> None:
    model = tiny_model(align={})
    assert model.align is not None
    model.align.enable()
    assert model.align.needs_reference
    x = torch.randint(0, 256, (2, 8))
    out = model(x, x)
    assert not model.align.needs_reference and bool(model.align.has_reference)
    assert out.aux_losses["align_kl"].item() == pytest.approx(0.0, abs=1e-6)
