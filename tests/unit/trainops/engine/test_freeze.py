"""``finetune.freeze`` and LoRA's frozen base: the pattern language over real APT names, errors
that list real names, tied weights, and training steps that leave frozen tensors bit-identical
with no gradient and no optimizer state."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from apt.core.config import FinetuneConfig, ModelConfig, config_from_dict
from apt.core.config.training import AdamWConfig
from apt.core.errors import ConfigError
from apt.model import APTModel
from apt.trainops.engine.freeze import apply_finetune, match_names, pattern_matches
from apt.trainops.engine.optim import build_optimizer


def _model(**overrides: object) -> APTModel:
    torch.manual_seed(0)
    shape = {"vocab_size": 64, "hidden_size": 32, "num_layers": 3, "num_heads": 2}
    return APTModel(ModelConfig.model_validate({**shape, "max_seq_len": 32, **overrides}))


def _finetune(**data: object) -> FinetuneConfig:
    return FinetuneConfig.model_validate(data)


def _names(model: APTModel) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=False)]


@pytest.mark.parametrize(
    ("pattern", "name", "hit"),
    [
        ("embeddings", "embed_tokens.weight", True),  # alias
        ("head", "lm_head.weight", True),
        ("layers.0-1", "blocks.1.attn.q_proj.weight", True),  # alias + range
        ("layers.0-1", "blocks.2.attn.q_proj.weight", False),
        ("blocks.10-12", "blocks.11.mlp.up_proj.weight", True),  # numbers, not text
        ("blocks.10-12", "blocks.1.mlp.up_proj.weight", False),
        ("q_proj", "blocks.0.attn.q_proj.weight", True),  # anywhere in the name
        ("attn", "blocks.0.attn.o_proj.weight", True),
        ("attn", "blocks.0.attn_norm.weight", False),  # whole components only
        ("norm", "norm.weight", True),
        ("norm", "blocks.0.mlp_norm.weight", False),
        ("*_norm", "blocks.0.mlp_norm.weight", True),  # a glob inside one component
        ("blocks.*.mlp", "blocks.2.mlp.down_proj.weight", True),
        ("blocks.*.mlp", "blocks.2.attn.q_proj.weight", False),
        ("mlp.*_proj", "blocks.0.mlp.gate_proj.weight", True),
        ("blocks.0.attn.q_proj.weight", "blocks.0.attn.q_proj.weight", True),  # exact
        ("blocks.0.attn.q_proj.weight.x", "blocks.0.attn.q_proj.weight", False),  # longer
    ],
)
def test_the_pattern_language(pattern: str, name: str, hit: bool) -> None:
    assert pattern_matches(pattern, name) is hit


def test_patterns_over_a_real_model_pick_the_documented_names() -> None:
    names = _names(_model())
    hits = match_names(["embeddings", "layers.0-1", "blocks.*.attn_norm"], names, key="k")
    assert hits["embeddings"] == ["embed_tokens.weight"]
    assert len(hits["layers.0-1"]) == 2 * 9 and all(
        n.startswith(("blocks.0.", "blocks.1.")) for n in hits["layers.0-1"]
    )
    assert hits["blocks.*.attn_norm"] == [f"blocks.{i}.attn_norm.weight" for i in range(3)]


def test_a_pattern_that_matches_nothing_lists_real_names() -> None:
    with pytest.raises(ConfigError) as info:
        apply_finetune(_finetune(freeze=["embeddings", "layers.7-9"]), model=_model())
    message = str(info.value)
    assert message.startswith("finetune.freeze: 'layers.7-9' matches no name of this model")
    assert "embed_tokens.weight" in message and "blocks.N.attn.q_proj.weight" in message
    assert "(N = 0-2)" in message


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("layers.5-2", "runs backwards"),
        ("blocks..attn", "empty component"),
        ("blocks/0", "component 'blocks/0' may hold"),
        ("", "is empty"),
    ],
)
def test_malformed_patterns_are_refused_at_load(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        config_from_dict({"finetune": {"freeze": ["embeddings", value]}})
    assert "finetune.freeze" in str(info.value)


def test_an_unknown_finetune_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("finetune.lora.rnak")):
        config_from_dict({"finetune": {"lora": {"rnak": 4}}})


def test_freezing_the_head_freezes_the_tied_embedding_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = _model()
    with caplog.at_level(logging.INFO, logger="apt"):
        plan = apply_finetune(_finetune(freeze=["head"]), model=model)
    assert not model.embed_tokens.weight.requires_grad  # one tensor, one requires_grad
    assert set(plan.frozen) == {"embed_tokens.weight", "lm_head.weight"}
    assert "embed_tokens.weight is lm_head.weight (tied weights), so both are frozen" in caplog.text
    untied = _model(tie_embeddings=False)
    apply_finetune(_finetune(freeze=["head"]), model=untied)
    assert untied.embed_tokens.weight.requires_grad and not untied.lm_head.weight.requires_grad


def _train_steps(model: APTModel, steps: int = 3) -> torch.optim.Optimizer:
    optimizer = build_optimizer(AdamWConfig(), model=model, learning_rate=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        model(ids, ids).loss.backward()
        optimizer.step()
    return optimizer


def test_frozen_parameters_get_no_gradient_no_state_and_stay_bit_identical() -> None:
    model = _model()
    plan = apply_finetune(_finetune(freeze=["embeddings", "layers.0-1"]), model=model)
    frozen = dict(model.named_parameters())
    frozen = {n: p for n, p in frozen.items() if n in plan.frozen}
    assert len(frozen) == 1 + 2 * 9  # the embedding (= head) and two whole blocks
    before = {n: p.detach().clone() for n, p in frozen.items()}
    optimizer = _train_steps(model)
    for name, param in frozen.items():
        assert torch.equal(param, before[name]), name
        assert param.grad is None, name
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    frozen_ids = {id(p) for p in frozen.values()}
    assert not in_groups & frozen_ids and not set(map(id, optimizer.state)) & frozen_ids
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trained} == in_groups and len(optimizer.state) == len(trained)
    assert not torch.equal(
        model.blocks[2].attn.q_proj.weight, _model().blocks[2].attn.q_proj.weight
    )
    assert plan.trainable == sum(p.numel() for p in trained)


def test_with_lora_only_adapters_and_the_named_base_parameters_train() -> None:
    model = _model()
    lora = {"rank": 2, "alpha": 4, "targets": ["q_proj", "v_proj"], "trainable": ["norm"]}
    plan = apply_finetune(_finetune(lora=lora, freeze=["layers.0.attn.q_proj"]), model=model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(plan.adapted) == 6 and plan.trainable_base == ["norm.weight"]
    assert trainable == [
        # blocks.0's q_proj adapter is frozen by finetune.freeze
        "blocks.0.attn.v_proj.lora_A",
        "blocks.0.attn.v_proj.lora_B",
        "blocks.1.attn.q_proj.lora_A",
        "blocks.1.attn.q_proj.lora_B",
        "blocks.1.attn.v_proj.lora_A",
        "blocks.1.attn.v_proj.lora_B",
        "blocks.2.attn.q_proj.lora_A",
        "blocks.2.attn.q_proj.lora_B",
        "blocks.2.attn.v_proj.lora_A",
        "blocks.2.attn.v_proj.lora_B",
        "norm.weight",
    ]
    assert plan.summary().startswith(f"{plan.trainable:,} of {plan.total:,} parameters train")
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    _train_steps(model)
    changed = [
        n for n, p in model.named_parameters() if ".lora_" not in n and not torch.equal(p, base[n])
    ]
    assert changed == ["norm.weight"]


def test_lora_targets_use_the_pattern_language_too() -> None:
    model = _model()
    plan = apply_finetune(_finetune(lora={"targets": ["layers.1-2.mlp.*_proj"]}), model=model)
    assert plan.adapted == [
        f"blocks.{i}.mlp.{p}_proj" for i in (1, 2) for p in ("gate", "up", "down")
    ]
    with pytest.raises(ConfigError, match=re.escape("finetune.lora.targets: 'wq' matches no name")):
        apply_finetune(_finetune(lora={"targets": ["wq"]}), model=_model())


def test_freezing_everything_is_refused() -> None:
    with pytest.raises(ConfigError, match="no parameter is left to train"):
        apply_finetune(_finetune(freeze=["*"]), model=_model())
    model = _model()
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(
        ConfigError, match=re.escape("training.optimizer: no parameter of the model")
    ):
        build_optimizer(AdamWConfig(), model=model, learning_rate=1e-3)


def test_lora_with_float8_is_refused_at_load() -> None:
    data = {"training": {"float8": "tensorwise", "precision": "bf16"}, "finetune": {"lora": {}}}
    with pytest.raises(
        ConfigError, match=re.escape("finetune.lora: LoRA adapters cannot train with")
    ):
        config_from_dict(data)
