"""generate(): the KV cache gives the same tokens as recomputing the whole sequence."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from apt.model import APTModel

Factory = Callable[..., APTModel]


def _greedy_by_recompute(model: APTModel, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    idx = prompt
    L = model.config.max_seq_len
    with torch.no_grad():
        for _ in range(steps):
            logits = model(idx[:, -L:]).logits[:, -1]
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


def _sharpened(model: APTModel) -> APTModel:
    # Larger weights so greedy decoding wanders instead of repeating one token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_kv_heads": 2}, {"moe": {"num_experts": 4, "top_k": 2, "enabled": True}}],
    ids=["mha", "gqa", "moe"],
)
def test_greedy_with_cache_equals_full_recompute(tiny_model: Factory, overrides: dict) -> None:
    model = _sharpened(tiny_model(**overrides))
    prompt = torch.randint(0, 256, (3, 5))
    cached = model.generate(prompt, max_new_tokens=30, temperature=0)
    assert cached.shape == (3, 35)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, _greedy_by_recompute(model, prompt, 30))
    assert len(set(cached[0, 5:].tolist())) > 2  # the check is not vacuous


def test_past_max_seq_len_the_window_slides(tiny_model: Factory) -> None:
    model = _sharpened(tiny_model(max_seq_len=16))
    prompt = torch.randint(0, 256, (2, 10))
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(out, _greedy_by_recompute(model, prompt, 20))


def test_one_dimensional_prompt_and_zero_tokens(tiny_model: Factory) -> None:
    model = tiny_model()
    prompt = torch.tensor([1, 2, 3])
    assert model.generate(prompt, 4, temperature=0).shape == (7,)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_sampling_is_reproducible_with_a_generator(tiny_model: Factory) -> None:
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 4))
    a = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    c = model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_restricts_the_choice(tiny_model: Factory) -> None:
    model = tiny_model().eval()
    prompt = torch.randint(0, 256, (64, 3))
    with torch.no_grad():
        top2 = model(prompt).logits[:, -1].topk(2).indices
    out = model.generate(
        prompt, 1, temperature=5.0, top_k=2, generator=torch.Generator().manual_seed(0)
    )
    assert (out[:, -1:] == top2).any(-1).all()


def test_generate_restores_training_mode_and_validates(tiny_model: Factory) -> None:
    model = tiny_model().train()
    model.generate(torch.tensor([1, 2]), 2)
    assert model.training
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([1]), 1, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 1)
