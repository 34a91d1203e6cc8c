"""``finetune:`` end to end with the Trainer: LoRA trains its adapters and leaves every base
weight bit-identical, checkpoints hold the adapters (a resumed run ends bit for bit where an
uninterrupted one does), the export merges them (logits as the adapted model's) or writes the
adapter alone (which loads back onto the base), and ``finetune.freeze`` keeps frozen tensors
out of the optimizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from apt.core.config import APTConfig, load_profile
from apt.model import APTModel, build_model, load_adapter
from apt.model.layers.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_modules
from apt.trainops.engine import Trainer

LORA = "finetune.lora={rank: 4, alpha: 8}"


def _config(tmp_path: Path, *extra: str) -> APTConfig:
    return load_profile(
        "cpu/tiny",
        overrides=[
            f"artifacts.output_dir={tmp_path}",
            "training.max_steps=6",
            "training.learning_rate=1e-2",
            "eval.interval=100",
            *extra,
        ],
    )


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def _unwrapped(trainer: Trainer) -> torch.nn.Module:
    return trainer.strategy.unwrap(trainer.model)


def test_lora_trains_adapters_only_and_exports_merged_weights(tmp_path: Path) -> None:
    trainer = Trainer.from_config(_config(tmp_path, LORA))
    model = _unwrapped(trainer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = {k for k in before if ".lora_" in k}
    assert len(adapters) == 2 * 7 * 2  # A and B on 7 projections in each of 2 blocks
    plan = trainer.finetune_plan
    assert plan is not None and plan.trainable == sum(before[k].numel() for k in adapters)
    assert 0.05 < plan.trainable / plan.total < 0.2  # cpu/tiny: 5,888 of 47,008 (12.5%)
    result = trainer.train()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value) is (key not in adapters), key
    optimizer = trainer.bundle.optimizer
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapter_ids = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert in_optimizer == adapter_ids and set(map(id, optimizer.state)) == adapter_ids
    checkpoint = load_file(
        str(
            sorted((result.run_dir / "checkpoints").glob("step-*"))[-1]
            / "model"
            / "model.safetensors"
        )
    )
    assert adapters <= set(checkpoint)  # a checkpoint holds the adapters

    exported = result.run_dir / "final_model"
    weights = load_file(str(exported / "model.safetensors"))
    assert not [k for k in weights if "lora" in k]
    plain = APTModel.from_pretrained(exported)
    assert lora_modules(plain) == {}
    ids = _ids()
    diff = (_logits(plain, ids) - _logits(model, ids)).abs().max().item()
    assert diff < 1e-4, diff  # 2e-7 measured
    assert lora_modules(model)  # the export did not merge the model being trained
    untrained = APTModel(plain.config)
    untrained.load_state_dict({k: v for k, v in before.items() if k not in adapters})
    moved = (_logits(plain, ids) - _logits(untrained, ids)).abs().max().item()
    assert moved > 100 * diff, (moved, diff)  # the merged adapters are in the export


def test_a_resumed_lora_run_ends_bit_for_bit_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    def run(name: str, steps: int, trained: int) -> Trainer:
        sets = [LORA, f"training.max_steps={steps}", f"artifacts.experiment_name={name}"]
        trainer = Trainer.from_config(_config(tmp_path, *sets))
        assert trainer.train().steps_run == trained
        return trainer

    golden = run("golden", 10, 10)
    run("split", 5, 5)  # checkpoints every 5 steps (cpu/tiny)
    resumed = run("split", 10, 5)
    assert resumed.state.global_step == 10
    got, want = _unwrapped(resumed).state_dict(), _unwrapped(golden).state_dict()
    assert set(got) == set(want) and any(".lora_" in k for k in got)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    got_opt = resumed.bundle.optimizer.state_dict()["state"]
    want_opt = golden.bundle.optimizer.state_dict()["state"]
    for index, entry in want_opt.items():
        for name, tensor in entry.items():
            assert torch.equal(got_opt[index][name], tensor), (index, name)


def test_an_adapter_only_export_loads_back_onto_its_base(tmp_path: Path) -> None:
    cfg = _config(tmp_path, LORA.replace("}", ", merge: false}"))
    torch.manual_seed(7)
    base = build_model(cfg.model.model_copy(update={"vocab_size": 256}))
    trainer = Trainer.from_config(cfg, model=copy.deepcopy(base))
    result = trainer.train()
    exported = result.run_dir / "final_model"
    assert sorted(p.name for p in exported.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    described = json.loads((exported / ADAPTER_CONFIG).read_text())
    assert (described["rank"], described["alpha"], len(described["modules"])) == (4, 8.0, 14)
    assert described["base_model"]["config"]["hidden_size"] == 32
    assert load_adapter(base, exported) == described["modules"]
    ids = _ids()
    assert torch.equal(_logits(base, ids), _logits(_unwrapped(trainer), ids))


def test_freeze_keeps_frozen_tensors_bit_identical_and_out_of_the_optimizer(
    tmp_path: Path,
) -> None:
    trainer = Trainer.from_config(_config(tmp_path, 'finetune.freeze=[embeddings, "layers.0"]'))
    model = _unwrapped(trainer)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert sorted(frozen)[:2] == ["blocks.0.attn.k_proj.weight", "blocks.0.attn.o_proj.weight"]
    assert "embed_tokens.weight" in frozen and len(frozen) == 1 + 9
    before = {n: p.detach().clone() for n, p in frozen.items()}
    trained_before = model.blocks[1].attn.q_proj.weight.detach().clone()
    trainer.train()
    for name, param in frozen.items():
        assert torch.equal(param, before[name]) and param.grad is None, name
    optimizer = trainer.bundle.optimizer
    held = {id(p) for g in optimizer.param_groups for p in g["params"]} | set(
        map(id, optimizer.state)
    )
    assert not held & {id(p) for p in frozen.values()}
    assert not torch.equal(model.blocks[1].attn.q_proj.weight, trained_before)
    assert APTModel.from_pretrained(trainer.run_dir / "final_model") is not None
