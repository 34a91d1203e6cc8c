"""LoRA layers: a fresh adapter changes nothing, the base weight keeps its name and tensor,
merged weights are ``W + s * B @ A`` (PEFT's formula, checked against PEFT itself), adapters
save and load on their own, and a compiled LoRA model trains its adapters only."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.errors import CheckpointError, ConfigError
from apt.model import APTModel
from apt.model.layers.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    merged_state_dict,
    save_adapter,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Factory = Callable[..., APTModel]


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Nonzero B (a fresh adapter has B = 0 and would hide every bug of the update path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * 0.2)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.2)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def test_a_fresh_adapter_computes_exactly_what_the_base_does(tiny_model: Factory) -> None:
    model, ids = tiny_model(), _ids()
    before = _logits(model, ids)
    adapted = apply_lora(model, targets=TARGETS, rank=4, alpha=8)
    assert len(adapted) == 2 * len(TARGETS)
    assert all(torch.count_nonzero(m.lora_B) == 0 for m in lora_modules(model).values())
    assert torch.equal(_logits(model, ids), before)


def test_the_base_weight_keeps_its_name_and_its_tensor(tiny_model: Factory) -> None:
    model = tiny_model()
    plain_keys = list(model.state_dict())
    q_weight = model.blocks[0].attn.q_proj.weight
    apply_lora(model, targets=["q_proj", "blocks.1.mlp.down_proj"], rank=2, alpha=4)
    layer = model.blocks[0].attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer, nn.Linear)
    assert layer.weight is q_weight  # shared, not copied: no second copy of the base
    added = sorted(set(model.state_dict()) - set(plain_keys))
    assert added == [
        "blocks.0.attn.q_proj.lora_A",
        "blocks.0.attn.q_proj.lora_B",
        "blocks.1.attn.q_proj.lora_A",
        "blocks.1.attn.q_proj.lora_B",
        "blocks.1.mlp.down_proj.lora_A",
        "blocks.1.mlp.down_proj.lora_B",
    ]
    assert layer.lora_A.shape == (2, 64) and layer.lora_B.shape == (64, 2)
    assert not isinstance(model.blocks[0].mlp.down_proj, LoRALinear)  # only block 1's


@pytest.mark.parametrize(("rslora", "scaling"), [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_merged_weights_are_w_plus_scaled_b_a_and_give_the_same_logits(
    tiny_model: Factory, rslora: bool, scaling: float
) -> None:
    model, ids = tiny_model(), _ids()
    plain_keys = set(model.state_dict())
    apply_lora(model, targets=TARGETS, rank=4, alpha=16, rslora=rslora)
    _randomise_adapters(model)
    lora_logits = _logits(model, ids)
    training_weights = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    assert set(merged) == plain_keys  # the plain layout: no lora_* keys
    layer = model.blocks[1].mlp.up_proj
    assert isinstance(layer, LoRALinear) and layer.scaling == pytest.approx(scaling)
    expected = layer.weight + scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(merged["blocks.1.mlp.up_proj.weight"], expected)
    for key, value in model.state_dict().items():  # the model being trained is untouched
        assert torch.equal(value, training_weights[key]), key
    plain = tiny_model(seed=5)  # other weights, then the merged ones loaded
    plain.load_state_dict(merged)
    merged_logits = _logits(plain, ids)
    diff = (merged_logits - lora_logits).abs().max().item()
    assert (lora_logits - _logits(tiny_model(), ids)).abs().max() > 0  # adapters matter
    assert diff < 1e-4, diff  # fp32 tolerance


def test_merge_lora_puts_plain_linears_back(tiny_model: Factory) -> None:
    model, ids = tiny_model(), _ids()
    apply_lora(model, targets=TARGETS, rank=4, alpha=8)
    _randomise_adapters(model)
    expected = _logits(model, ids)
    assert len(merge_lora(model)) == 14
    assert lora_modules(model) == {}
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-4, rtol=1e-4)


def test_an_adapter_saves_alone_and_loads_onto_a_fresh_base(
    tiny_model: Factory, tmp_path: Path
) -> None:
    model, ids = tiny_model(), _ids()
    apply_lora(model, targets=TARGETS, rank=4, alpha=8, dropout=0.1)
    _randomise_adapters(model)
    with torch.no_grad():
        model.norm.weight.mul_(1.5)  # a base parameter trained beside the adapters
    save_adapter(model, tmp_path / "adapter", trainable=["norm.weight"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
    ]
    described = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (described["rank"], described["alpha"], described["dropout"]) == (4, 8.0, 0.1)
    assert described["modules"][:2] == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj"]
    assert described["trainable"] == ["norm.weight"]
    base = described["base_model"]
    assert base["class"] == "APTModel" and base["config"]["hidden_size"] == 64
    assert base["parameters"] == sum(p.numel() for p in tiny_model().parameters())

    fresh = tiny_model()  # the same base weights (same seed)
    assert load_adapter(fresh, tmp_path / "adapter") == described["modules"]
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))  # bit for bit
    merged = tiny_model()
    load_adapter(merged, tmp_path / "adapter", merge=True)
    assert lora_modules(merged) == {}
    torch.testing.assert_close(_logits(merged, ids), _logits(model, ids), atol=1e-4, rtol=1e-4)


def test_an_adapter_for_another_base_is_refused(tiny_model: Factory, tmp_path: Path) -> None:
    model = tiny_model()
    apply_lora(model, targets=["q_proj"], rank=2, alpha=2)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.q_proj\.lora_A has shape"):
        load_adapter(tiny_model(hidden_size=32), tmp_path / "a")
    with pytest.raises(CheckpointError, match=re.escape("lacks: blocks.1.attn.q_proj")):
        load_adapter(tiny_model(num_layers=1), tmp_path / "a")
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapter(tiny_model(), tmp_path)
    (tmp_path / "a" / ADAPTER_CONFIG).write_text('{"format": "apt-lora", "format_version": 1}')
    with pytest.raises(CheckpointError, match="missing or invalid rank"):
        load_adapter(tiny_model(), tmp_path / "a")


def test_targets_that_name_nothing_or_a_tied_weight_are_config_errors(
    tiny_model: Factory,
) -> None:
    with pytest.raises(ConfigError, match=r"\['qproj'\] name no linear layer.*q_proj"):
        apply_lora(tiny_model(), targets=["qproj"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match=re.escape("lm_head.weight is tied")):
        apply_lora(tiny_model(), targets=["lm_head"], rank=2, alpha=2)
    untied = tiny_model(tie_embeddings=False)
    assert apply_lora(untied, targets=["lm_head"], rank=2, alpha=2) == ["lm_head"]
    model = tiny_model()
    apply_lora(model, targets=["q_proj"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="has LoRA adapters already"):
        apply_lora(model, targets=["q_proj"], rank=2, alpha=2)


@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_and_merged_weights_agree_with_peft(tiny_model: Factory, rslora: bool) -> None:
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    base, ids = tiny_model(), _ids()
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, use_rslora=rslora),
        copy.deepcopy(base),
    )
    ours = base
    apply_lora(ours, targets=TARGETS, rank=4, alpha=16, rslora=rslora)
    _randomise_adapters(ours)
    with torch.no_grad():
        for name, layer in lora_modules(ours).items():
            peft_layer = theirs.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    torch.testing.assert_close(_logits(theirs, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)
    merged = merged_state_dict(ours)
    for name in lora_modules(ours):
        peft_layer = theirs.get_submodule(name)
        peft_layer.merge()
        torch.testing.assert_close(
            peft_layer.base_layer.weight, merged[f"{name}.weight"], atol=1e-6, rtol=1e-6
        )


def _compiles_on_cpu() -> bool:
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception:  # no C compiler, no inductor: nothing to test here
        return False
    return True


def test_a_compiled_lora_model_trains_its_adapters_only(tiny_model: Factory) -> None:
    if not _compiles_on_cpu():
        pytest.skip("torch.compile cannot compile on this CPU (no C++ compiler / inductor)")
    model = tiny_model(hidden_size=32, num_heads=2, num_layers=1, vocab_size=64)
    apply_lora(model, targets=TARGETS, rank=2, alpha=4)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=0.5)
    compiled = torch.compile(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # B moves at step 1 (A's gradient is B-weighted: zero), A at step 2
        optimizer.zero_grad(set_to_none=True)
        compiled(ids, ids).loss.backward()
        optimizer.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    changed = [k for k, v in adapters.items() if not torch.equal(state[k], v)]
    assert len(changed) == len(adapters)  # every A and every B
