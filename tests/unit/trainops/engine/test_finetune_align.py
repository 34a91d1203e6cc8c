"""``finetune.align``: the KL to the starting model as a fine-tuning regulariser, on a real tiny
APT model: the reference is the model before the first step (for LoRA, the base model), it
copies only what trains, the KL is averaged over trained positions only, a larger weight keeps
the model nearer its start, and bad combinations are refused naming the key."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import BigramLM

from apt.core.config import FinetuneConfig, ModelConfig
from apt.core.errors import ConfigError
from apt.model import APTModel
from apt.trainops.engine.freeze import FinetunePlan, apply_finetune, check_align_strategy

V, T = 64, 16


def _model(**overrides: object) -> APTModel:
    torch.manual_seed(0)
    shape = {"vocab_size": V, "hidden_size": 32, "num_layers": 2, "num_heads": 2}
    return APTModel(ModelConfig.model_validate({**shape, "max_seq_len": 32, **overrides}))


def _finetune(model: APTModel, **data: object) -> FinetunePlan:
    return apply_finetune(FinetuneConfig.model_validate(data), model=model)


def _batches(n: int, seed: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rows ``s, s+3, s+6, ...`` (learnable), targets shifted by one, the first 6 ignored (a
    prompt)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        start = torch.randint(0, V, (4, 1), generator=gen)
        ids = (start + 3 * torch.arange(T + 1)) % V  # (4, T + 1)
        targets = ids[:, 1:].clone()
        targets[:, :6] = -100
        yield ids[:, :-1], targets


def _train(model: APTModel, steps: int, lr: float = 1e-2) -> None:
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    for ids, targets in _batches(steps):
        model(ids, targets).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _kl_per_position(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q) at each position (B, T), written out, in float64."""
    p, q = F.softmax(logits.double(), -1), F.softmax(ref.double(), -1)
    return (p * (p.log() - q.log())).sum(-1)


def _kl(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over ``mask`` of the KL at each position."""
    return float(_kl_per_position(logits, ref)[mask].mean())


def _align_kl(model: APTModel, ids: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(ids, targets).aux_losses["align_kl"])


def test_the_reference_is_the_starting_weights_and_the_kl_grows_from_zero() -> None:
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = _finetune(model, align={"loss_weight": 1.0})
    assert model.align is not None and model.align.enabled
    reference = model.align.reference()
    assert plan.reference == list(start) == list(reference)  # full fine-tune: every tensor
    assert plan.reference_values == model.num_parameters() == 34_976
    assert all(torch.equal(reference[n], start[n]) for n in start)
    assert all(not t.requires_grad for t in reference.values())
    ids, targets = next(_batches(1, seed=7))
    assert _align_kl(model, ids, targets) == 0.0
    _train(model, 8)
    assert all(torch.equal(model.align.reference()[n], start[n]) for n in start)
    kl = _align_kl(model, ids, targets)
    assert kl > 1e-3, kl  # 0.13 measured
    out = model(ids, targets)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["align_kl"])


def test_the_kl_averages_over_the_trained_positions_only() -> None:
    model = _model()
    _finetune(model, align={"loss_weight": 0.5})
    _train(model, 6)
    ids, targets = next(_batches(1, seed=7))
    with torch.no_grad():
        logits = model(ids).logits
        ref = model.reference_logits(ids)
    assert logits is not None
    per_position = _kl_per_position(logits, ref)  # (B, T)
    # Ignore (as a prompt) the three quarters of the positions where the model moved most.
    targets = targets.masked_fill(per_position > per_position.quantile(0.25), -100)
    trained = targets != -100
    want = float(per_position[trained].mean())
    everywhere = float(per_position.mean())
    assert want < 0.75 * everywhere, (want, everywhere)  # the mask matters: 0.045 vs 0.077
    got = _align_kl(model, ids, targets) / 0.5
    assert got == pytest.approx(want, rel=1e-5), (got, want, everywhere)


def test_packed_rows_compare_with_a_reference_that_keeps_the_documents_apart() -> None:
    model = _model()
    _finetune(model, align={})
    ids, targets = next(_batches(1, seed=3))
    documents = (torch.arange(T) >= T // 2).long().expand(4, T)  # two documents a row
    with torch.no_grad():
        out = model(ids, targets, document_ids=documents)
        ref = model.reference_logits(ids, document_ids=documents)
        causal = model.reference_logits(ids)
    assert out.logits is not None and torch.equal(ref, out.logits)
    assert float(out.aux_losses["align_kl"]) == 0.0
    assert (causal - ref).abs().max() > 1e-2  # what a reference blind to the documents sees


def test_with_lora_the_reference_is_the_base_model_and_copies_the_adapters_only() -> None:
    model = _model(tie_embeddings=False)
    base = copy.deepcopy(model)
    plan = _finetune(model, lora={"rank": 4, "alpha": 8}, align={"loss_weight": 0.1})
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert plan.reference == adapters and len(adapters) == 2 * 7 * 2
    assert plan.reference_values == plan.trainable  # the frozen base is not copied
    _train(model, 8)
    ids, _ = next(_batches(1, seed=7))
    with torch.no_grad():
        want, live = base(ids).logits, model(ids).logits
        got = model.reference_logits(ids)
    assert want is not None and live is not None
    assert (live - want).abs().max() > 1e-2  # the adapters moved the model
    assert torch.equal(got, want)  # bitwise: base weights as they are, B = 0 in the reference


def test_with_freeze_the_reference_copies_what_trains_and_is_the_starting_model() -> None:
    model = _model()
    start = copy.deepcopy(model)
    plan = _finetune(model, freeze=["embeddings", "layers.0"], align={})
    trains = [n for n, p in model.named_parameters() if p.requires_grad]
    assert plan.reference == trains and "embed_tokens.weight" not in plan.reference
    assert len(trains) == 9 + 1  # blocks.1 and the final norm
    _train(model, 8)
    ids, _ = next(_batches(1, seed=7))
    with torch.no_grad():
        assert torch.equal(model.reference_logits(ids), start(ids).logits)


def test_moe_layers_switched_on_later_are_upcycled_in_the_reference_too() -> None:
    model = _model(moe={"num_experts": 4})
    # A frozen dense weight of an MoE layer is copied too: the reference upcycles from it.
    plan = _finetune(model, freeze=["blocks.1.mlp.gate_proj", "blocks.0.attn"], align={})
    assert "blocks.1.mlp.gate_proj.weight" in plan.reference
    assert "blocks.0.attn.q_proj.weight" not in plan.reference  # frozen: stands for itself
    assert len(plan.reference) == 28 - 4
    model.controllable_modules()["moe"].enable()
    model.eval()  # drop-free routing: upcycled experts reproduce the dense MLP exactly
    ids, targets = next(_batches(1, seed=7))
    assert _align_kl(model, ids, targets) == pytest.approx(0.0, abs=1e-6)


def _kl_to_start_after_training(loss_weight: float) -> float:
    model = _model()
    start = copy.deepcopy(model)
    _finetune(model, align={"loss_weight": loss_weight})
    _train(model, 20)
    ids, targets = next(_batches(1, seed=11))
    with torch.no_grad():
        logits, ref = model(ids).logits, start(ids).logits
    assert logits is not None and ref is not None
    return _kl(logits, ref, targets != -100)


def test_a_larger_loss_weight_keeps_the_model_nearer_its_start() -> None:
    free, held = _kl_to_start_after_training(0.0), _kl_to_start_after_training(10.0)
    assert free > 0.1, free  # 1.18 measured (weight 1: 0.68)
    assert held < 0.25 * free, (held, free)  # 0.050 measured


def test_the_state_dict_holds_the_reference_and_an_export_does_not(tmp_path: Path) -> None:
    model = _model()
    _finetune(model, freeze=["embeddings"], align={})
    _train(model, 3)
    state = model.state_dict()
    assert "align.ref__blocks__0__attn__q_proj__weight" in state
    assert "align.ref__embed_tokens__weight" not in state  # frozen: not copied
    folder = model.save_pretrained(tmp_path / "export")
    loaded = APTModel.from_pretrained(folder)
    assert loaded.config.align is None and loaded.align is None
    ids, _ = next(_batches(1, seed=7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # A fresh model of the run, fine-tuned the same way, loads the checkpoint state back.
    resumed = _model(init_std=0.5)
    _finetune(resumed, freeze=["embeddings"], align={})
    resumed.load_state_dict(state)
    assert model.align is not None and resumed.align is not None
    assert not resumed.align.needs_reference
    for name, tensor in model.align.reference().items():
        assert torch.equal(resumed.align.reference()[name], tensor), name


def test_a_model_that_is_not_an_apt_model_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^finetune\.align: .* this model is a BigramLM"):
        apply_finetune(FinetuneConfig.model_validate({"align": {}}), model=BigramLM())


def test_a_model_with_its_own_align_loss_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"finetune\.align: the model has model\.align already"):
        _finetune(_model(align={}), align={})


def test_sharded_strategies_are_refused() -> None:
    cfg, plain = FinetuneConfig.model_validate({"align": {}}), _model()
    with pytest.raises(ConfigError, match=r"^finetune\.align: .*strategy fsdp, which shards"):
        check_align_strategy(cfg, model=plain, strategy="fsdp", sharded=True)
    check_align_strategy(cfg, model=plain, strategy="ddp", sharded=False)
    check_align_strategy(FinetuneConfig(), model=plain, strategy="fsdp", sharded=True)
    # model.align runs the same reference forward
    aligned = _model(align={})
    with pytest.raises(ConfigError, match=r"^model\.align: .*strategy tensor, .*remove model"):
        check_align_strategy(FinetuneConfig(), model=aligned, strategy="tensor", sharded=True)
    check_align_strategy(FinetuneConfig(), model=aligned, strategy="ddp", sharded=False)
