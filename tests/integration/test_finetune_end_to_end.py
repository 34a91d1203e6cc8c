"""Issue 16's whole path on real parts: raw text -> BPE tokenizer -> shards -> a tiny pre-trained
model -> exported under a name -> ``from_pretrained(name)`` -> fine-tuned on an instruction set
three ways (all weights, LoRA, frozen layers), each through another entry point (``Finetuner``,
``python -m apt finetune``, ``Finetuner.from_config``) -> each saved model reloads and scores
its held-out completions better than the base did -> the fine-tuned model goes to
``transformers`` with equal logits."""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from apt.cli.main import main
from apt.core.config import DataConfig, load_profile
from apt.model import APTModel
from apt.trainops.data import python_stdlib_files
from apt.trainops.data.sft import build_sft_datasets
from apt.trainops.engine import Finetuner
from apt.trainops.engine.tasks.sft import SFTTask
from apt.trainops.eval import Evaluator

SEQ_LEN = 64
BASE = "tiny-base"
TINY = "cpu/finetune_tiny"


def _instructions(words: list[str]) -> list[dict[str, str]]:
    """Two small skills over real words: upper-casing and reversing them."""
    records = []
    for word in words:
        records.append({"prompt": f"Upper case: {word}", "completion": word.upper()})
        records.append({"prompt": f"Reverse: {word}", "completion": word[::-1]})
    return records


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """A pre-trained tiny BPE model in a store of its own under ``BASE``, and the instruction
    files (the store outlives conftest's per-test ``APT_HOME``: the test sets it again)."""
    tmp = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("APT_HOME", str(tmp / "store"))
        yield _pretrained(tmp)


def _pretrained(tmp: Path) -> dict[str, Path]:
    lines = [
        json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")})
        for path in python_stdlib_files()[:30]
    ]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer, shards = tmp / "tok", tmp / "shards"
    command = ["data", "tokenizer", "--input", str(corpus), "--vocab-size", "512"]
    assert main([*command, "--output", str(tokenizer)]) == 0
    command = ["data", "prepare", "--input", str(corpus), "--output", str(shards)]
    assert main([*command, "--tokenizer", str(tokenizer), "--val-fraction", "0.1"]) == 0
    sets = [
        f"data.source.path={shards}",
        "model.vocab_size=auto",
        "model.hidden_size=64",
        f"model.max_seq_len={SEQ_LEN}",
        f"data.seq_len={SEQ_LEN}",
        "training.max_steps=40",
        f"artifacts.output_dir={tmp}",
        "artifacts.experiment_name=pretrain",
    ]
    assert (
        main(["train", "--profile", "cpu/pretrain_tiny", *[a for s in sets for a in ("--set", s)]])
        == 0
    )
    assert main(["export", str(tmp / "pretrain"), "--name", BASE]) == 0

    words = sorted({w for w in dir(builtins) if w.isalpha() and w.islower() and len(w) <= 9})
    held_out = words[::5]
    train = [w for w in words if w not in held_out]
    return {
        "tmp": tmp,
        "store": tmp / "store",
        "train": _write_jsonl(tmp / "train.jsonl", _instructions(train)),
        "val": _write_jsonl(tmp / "val.jsonl", _instructions(held_out)),
    }


def _held_out(model: APTModel, work: dict[str, Path]) -> Dataset:
    """The held-out examples, encoded with ``model``'s tokenizer as the runs encode them."""
    assert model.tokenizer is not None
    path = str(model.tokenizer.path)  # type: ignore[attr-defined]
    data = DataConfig.model_validate(
        {
            "source": {"kind": "sft", "path": str(work["train"]), "val_path": str(work["val"])},
            "tokenizer": {"kind": "bpe", "path": path},
            "seq_len": SEQ_LEN,
        }
    )
    return build_sft_datasets(data, seed=0).val


def _completion_loss(model: APTModel, work: dict[str, Path]) -> float:
    """Mean loss over the completion tokens of the held-out examples."""
    evaluator = Evaluator(model=model, eval_dataset=_held_out(model, work), task=SFTTask())
    return evaluator.evaluate()["loss"]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pretrain_export_by_name_finetune_three_ways_and_take_it_to_transformers(
    work: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = work["tmp"]
    monkeypatch.setenv("APT_HOME", str(work["store"]))
    base = APTModel.from_pretrained(BASE)
    base_state, base_loss = _state(base), _completion_loss(base, work)
    assert base.tokenizer is not None and base.tokenizer.name == "bpe"

    # 1. All weights: the seed-002 call, with the examples file as train_dataset.
    full = Finetuner(
        model=APTModel.from_pretrained(BASE),
        train_dataset=str(work["train"]),
        learning_rate=3e-3,
        num_epochs=3,
        output_dir=str(tmp),
        experiment_name="full",
    )
    assert full.config.training.task.kind == "sft"
    assert full.config.data.seq_len == SEQ_LEN  # the default 128 shrinks to the model's 64
    assert full.config.data.tokenizer.kind == "bpe"  # the model's own tokenizer reads the data
    full.finetune()
    full_dir = full.save_model(tmp / "full-model")
    full_model = APTModel.from_pretrained(full_dir)
    full_loss = _completion_loss(full_model, work)

    # 2. LoRA through the command line, the base named by the store.
    lora_sets = [
        # The chat markers are new tokens to the base: their embedding rows must train too.
        "finetune.lora={rank: 8, alpha: 16, merge: true, trainable: [embeddings]}",
        "training.learning_rate=1e-2",
        "training.num_epochs=10",
        f"artifacts.output_dir={tmp}",
        "artifacts.experiment_name=lora",
    ]
    command = ["finetune", "--profile", TINY, "--model", BASE, "--data", str(work["train"])]
    assert main([*command, *[a for s in lora_sets for a in ("--set", s)]]) == 0
    lora_model = APTModel.from_pretrained(tmp / "lora" / "final_model")
    lora_loss = _completion_loss(lora_model, work)

    # 3. The first block frozen, from the profile through Finetuner.from_config.
    cfg = load_profile(
        TINY,
        overrides=[
            f"finetune.base_model={BASE}",
            f"data.source.path={work['train']}",
            "finetune.freeze=[layers.0]",
            "training.learning_rate=3e-3",
            "training.num_epochs=10",
            f"artifacts.output_dir={tmp}",
            "artifacts.experiment_name=frozen",
        ],
    )
    frozen = Finetuner.from_config(cfg)
    frozen.finetune()
    frozen_model = APTModel.from_pretrained(tmp / "frozen" / "final_model")
    frozen_loss = _completion_loss(frozen_model, work)

    # Each learnt the held-out skill better than the base knew it.
    print(
        f"held-out completion loss: base {base_loss:.3f}, full {full_loss:.3f}, "
        f"lora {lora_loss:.3f}, frozen {frozen_loss:.3f}"
    )
    for name, loss in (("full", full_loss), ("lora", lora_loss), ("frozen", frozen_loss)):
        assert loss < 0.75 * base_loss, f"{name}: {loss:.3f} vs base {base_loss:.3f}"

    # LoRA (merged) changed the adapted projections and the embedding (tied to the head) only;
    # freezing kept its tensors bit-equal and trained the rest.
    lora_state, frozen_state = _state(lora_model), _state(frozen_model)
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for key, value in base_state.items():
        trained = key.startswith(("embed_tokens.", "lm_head.")) or any(
            f".{p}." in key for p in adapted
        )
        assert torch.equal(lora_state[key], value) != trained, key
        is_frozen = key.startswith("blocks.0.")
        assert torch.equal(frozen_state[key], value) == is_frozen, key
    assert set(lora_state) == set(base_state) == set(frozen_state)

    # The fully fine-tuned model in transformers: equal logits, the same greedy tokens.
    transformers = pytest.importorskip("transformers")
    hf_dir = tmp / "full-hf"
    assert main(["export", str(full_dir), "--format", "hf", "--output", str(hf_dir)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    hf.eval()
    full_model.eval()
    ids = torch.tensor([full_model.tokenizer.encode("Upper case: print")])  # type: ignore[union-attr]
    with torch.no_grad():
        ours = full_model(ids).logits
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.encode("Upper case: print", add_special_tokens=False) == ids[0].tolist()
