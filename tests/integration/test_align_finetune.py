"""``finetune.align`` end to end with the Trainer: an sft fine-tune (packed rows) with the KL to
the starting model resumes bit for bit, its reference coming back from the checkpoint (not
re-taken from the model the resumed run was handed), and a LoRA fine-tune with it exports a
plain model that loads without align."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apt.core.config import APTConfig, load_profile
from apt.model import APTModel, build_model
from apt.trainops.engine import Trainer

SEQ = 128
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
ALIGN = "finetune.align={loss_weight: 1.0}"


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 prompt/completion examples: repeat two words back."""
    rng = random.Random(0)
    lines = []
    for _ in range(80):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        lines.append({"prompt": f"say {a} {b}", "completion": f"{a} {b}"})
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _sft_config(examples: Path, tmp_path: Path, *extra: str) -> APTConfig:
    return load_profile(
        "cpu/tiny",
        overrides=[
            "training.task=sft",
            f"data.source={{kind: sft, path: {examples}, val_fraction: 0.1}}",
            "data.max_corpus_bytes=null",
            f"data.seq_len={SEQ}",
            f"model.max_seq_len={SEQ}",
            "training.learning_rate=1e-2",
            "training.checkpoints.save_interval=3",
            "eval.interval=100",
            f"artifacts.output_dir={tmp_path}",
            ALIGN,
            *extra,
        ],
    )


def _pretrained(cfg: APTConfig, seed: int) -> APTModel:
    """Stands in for a model loaded with from_pretrained: built without model.align."""
    torch.manual_seed(seed)
    return build_model(cfg.model.model_copy(update={"vocab_size": 256}))


def _unwrapped(trainer: Trainer) -> torch.nn.Module:
    return trainer.strategy.unwrap(trainer.model)


def test_a_resumed_align_finetune_ends_bit_for_bit_where_an_uninterrupted_one_does(
    examples: Path, tmp_path: Path
) -> None:
    def run(name: str, steps: int, trained: int, seed: int) -> Trainer:
        cfg = _sft_config(
            examples, tmp_path, f"training.max_steps={steps}", f"artifacts.experiment_name={name}"
        )
        trainer = Trainer.from_config(cfg, model=_pretrained(cfg, seed))
        assert trainer.train().steps_run == trained
        return trainer

    golden = run("golden", 6, 6, seed=0)
    run("split", 3, 3, seed=0)
    # Handed other weights: the checkpoint's weights and reference replace them.
    resumed = run("split", 6, 3, seed=5)
    assert resumed.state.global_step == 6
    got, want = _unwrapped(resumed).state_dict(), _unwrapped(golden).state_dict()
    references = [k for k in want if k.startswith("align.ref__")]
    assert set(got) == set(want) and len(references) == 20  # every tensor: a full fine-tune
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    start = _pretrained(_sft_config(examples, tmp_path), seed=0)
    for name, param in start.named_parameters():
        reference = want["align.ref__" + name.replace(".", "__")]
        assert torch.equal(reference, param), name  # the weights before the first step
    model = _unwrapped(golden)
    batch = next(iter(golden.train_loader))
    assert int(batch["document_ids"].max()) >= 2  # packed rows
    with torch.no_grad():
        out = model(batch["input_ids"], batch["labels"], document_ids=batch["document_ids"])
    kl = float(out.aux_losses["align_kl"])
    assert kl > 1e-3, kl  # 0.48 measured after 6 steps (weight 1.0)


def test_a_lora_finetune_with_align_exports_a_plain_model(tmp_path: Path) -> None:
    cfg = load_profile(
        "cpu/tiny",
        overrides=[
            f"artifacts.output_dir={tmp_path}",
            "training.max_steps=6",
            "training.learning_rate=1e-2",
            "eval.interval=100",
            "finetune.lora={rank: 4, alpha: 8}",
            ALIGN,
        ],
    )
    trainer = Trainer.from_config(cfg, model=_pretrained(cfg, seed=0))
    plan = trainer.finetune_plan
    assert plan is not None and plan.reference_values == plan.trainable == 5_888
    result = trainer.train()
    checkpoint = load_file(
        str(sorted((result.run_dir / "checkpoints").glob("step-*"))[-1] / "model/model.safetensors")
    )
    held = sorted(k for k in checkpoint if k.startswith("align.ref__"))
    assert len(held) == 28 and all("__lora_" in k for k in held)  # the adapters, not the base
    exported = result.run_dir / "final_model"
    assert not [k for k in load_file(str(exported / "model.safetensors")) if "align" in k]
    assert json.loads((exported / "config.json").read_text())["align"] is None
    plain = APTModel.from_pretrained(exported)
    assert plain.align is None
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model = _unwrapped(trainer)
    model.eval()
    with torch.no_grad():
        diff = (plain(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
