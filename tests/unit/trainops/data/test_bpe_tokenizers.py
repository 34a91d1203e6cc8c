"""BPE and HF tokenizers: training one on real text, reading tokenizer.json files, and the
tokenizer travelling with the model (run folder, exports, from_pretrained, generate(text))."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from apt.core.config import load_profile
from apt.core.errors import ConfigError, DataError
from apt.model import APTLargeModel
from apt.model.tokenizers import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    JSONTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from apt.trainops.data import python_stdlib_files
from apt.trainops.data.bpe import MIN_VOCAB_SIZE, train_bpe
from apt.trainops.data.tokenizers import (
    build_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
)
from apt.trainops.engine import Trainer

UNSEEN = "def añadir(x: int) -> str:\n    return f'{x} 日本語 ✓'  # nothing like it\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 modules of the standard library, as .txt files."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(python_stdlib_files()[:60]):
        text = path.read_text(encoding="utf-8", errors="replace")
        (folder / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bpe_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe([str(corpus / "*.txt")], vocab_size=1024, output=out)
    return out


def test_a_trained_bpe_has_its_size_special_tokens_and_compresses_code(
    bpe_dir: Path, corpus: Path
) -> None:
    tok = build_tokenizer({"kind": "bpe", "path": str(bpe_dir)})
    assert tok.vocab_size == 1024 and tok.name == "bpe"
    assert isinstance(tok, JSONTokenizer)
    assert [tok.encode(s) for s in SPECIAL_TOKENS] == [[i] for i in range(len(SPECIAL_TOKENS))]
    assert tok.eos_id == 0
    text = (corpus / "000.txt").read_text(encoding="utf-8")
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2  # merges learnt from code
    assert tok.decode(tok.encode(UNSEEN)) == UNSEEN  # byte-level: nothing is unknown


def test_training_is_deterministic(bpe_dir: Path, corpus: Path, tmp_path: Path) -> None:
    again = train_bpe([str(corpus / "*.txt")], vocab_size=1024, output=tmp_path)
    assert again.read_bytes() == (bpe_dir / "tokenizer.json").read_bytes()


def test_token_bytes_count_the_utf8_bytes_of_the_text(bpe_dir: Path) -> None:
    tok = build_tokenizer({"kind": "bpe", "path": str(bpe_dir)})
    lengths = token_byte_lengths(tok)
    ids = tok.encode(UNSEEN)
    assert int(lengths[torch.tensor(ids)].sum()) == len(UNSEEN.encode("utf-8"))
    assert all(int(lengths[i]) == 0 for i in range(len(SPECIAL_TOKENS)))  # no text


def test_out_of_range_ids_decode_to_the_replacement_character(bpe_dir: Path) -> None:
    tok = build_tokenizer({"kind": "bpe", "path": str(bpe_dir)})
    ids = tok.encode("ab")
    assert tok.decode([*ids, 5000, *ids]) == "ab\ufffdab"


def test_pickled_tokenizers_encode_the_same_and_keep_their_fingerprint(bpe_dir: Path) -> None:
    tok = build_tokenizer({"kind": "bpe", "path": str(bpe_dir)})
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(UNSEEN) == tok.encode(UNSEEN)
    assert tokenizer_fingerprint(copy) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(ByteTokenizer())


def test_an_hf_tokenizer_file_with_its_own_end_of_text(bpe_dir: Path, tmp_path: Path) -> None:
    spec = json.loads((bpe_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for token in spec["added_tokens"]:
        token["content"] = token["content"].replace("<|endoftext|>", "<|stop|>")
    spec["model"]["vocab"]["<|stop|>"] = spec["model"]["vocab"].pop("<|endoftext|>")
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"no end-of-text token .* eos_token"):
        build_tokenizer({"kind": "hf", "path": str(file)})
    tok = build_tokenizer({"kind": "hf", "path": str(file), "eos_token": "<|stop|>"})
    assert tok.eos_id == 0 and tok.name == "hf"


def test_transformers_reads_the_same_ids_from_the_file(bpe_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))
    tok = build_tokenizer({"kind": "bpe", "path": str(bpe_dir)})
    assert fast(UNSEEN, add_special_tokens=False)["input_ids"] == tok.encode(UNSEEN)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing", "not found"),
        ("empty_dir", "holds no tokenizer.json"),
        ("not_json", "is not a tokenizers tokenizer.json"),
    ],
)
def test_bad_tokenizer_paths_name_the_path_and_the_fix(
    tmp_path: Path, path: str, message: str
) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "not_json").write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        build_tokenizer({"kind": "bpe", "path": str(tmp_path / path)})
    assert str(tmp_path / path) in str(caught.value)
    assert "data.tokenizer.path" in str(caught.value)


def test_a_vocabulary_too_small_for_the_bytes_is_refused(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_bpe([str(corpus / "*.txt")], vocab_size=100, output=tmp_path)


def test_an_input_that_matches_nothing_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--input"):
        train_bpe([str(tmp_path / "*.txt")], vocab_size=512, output=tmp_path / "out")


def test_save_and_load_round_trip(bpe_dir: Path, tmp_path: Path) -> None:
    tok = build_tokenizer({"kind": "bpe", "path": str(bpe_dir)})
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path / "bpe"))
    assert loaded is not None and loaded.name == "bpe"
    assert loaded.encode(UNSEEN) == tok.encode(UNSEEN)
    byte = load_tokenizer(save_tokenizer(ByteTokenizer(), tmp_path / "byte"))
    assert isinstance(byte, ByteTokenizer)
    assert load_tokenizer(tmp_path) is None  # neither file


# ----------------------------------------------------------------------------- with a run
def _bpe_config(tmp_path: Path, bpe_dir: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return load_profile(
        "cpu/tiny",
        overrides=[
            f"data.tokenizer={{kind: bpe, path: {bpe_dir}}}",
            "model.vocab_size=auto",
            "training.max_steps=12",
            f"artifacts.output_dir={tmp_path}",
            *overrides,
        ],
    )


def test_a_bpe_run_sizes_the_model_and_its_exports_carry_the_tokenizer(
    tmp_path: Path, bpe_dir: Path
) -> None:
    trainer = Trainer.from_config(_bpe_config(tmp_path, bpe_dir))
    assert trainer.config.model.vocab_size == 1024  # 1024 is a multiple of 64 already
    trainer.train()
    run = trainer.run_dir
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    model = APTLargeModel.from_pretrained(run / "final_model")
    assert model.tokenizer is not None and model.tokenizer.name == "bpe"
    assert model.tokenizer.encode(UNSEEN) == trainer.tokenizer.encode(UNSEEN)  # type: ignore[union-attr]
    torch.manual_seed(0)
    text = model.generate("def ", max_new_tokens=8, temperature=0)
    assert isinstance(text, str) and text.startswith("def ")
    # Bits per byte count the bytes each token stands for: fewer than the nats per token.
    last = [r for r in trainer.artifacts.read_metrics() if "val_bpb" in r][-1]
    assert math.isfinite(last["val_bpb"])
    assert last["val_bpb"] < last["val_loss"] / math.log(2)


def test_auto_rounds_up_to_a_multiple_of_64(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "bpe1000"
    train_bpe([str(corpus / "*.txt")], vocab_size=1000, output=out)
    trainer = Trainer.from_config(_bpe_config(tmp_path, out, "training.max_steps=1"))
    assert trainer.config.model.vocab_size == 1024


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(
    tmp_path: Path, bpe_dir: Path
) -> None:
    cfg = _bpe_config(tmp_path, bpe_dir, "model.vocab_size=512")
    with pytest.raises(ConfigError, match=r"512 is smaller .* \(1024 ids\).* at least 1024"):
        Trainer.from_config(cfg)


def test_generate_with_text_needs_a_tokenizer() -> None:
    model = APTLargeModel(hidden_size=32, num_layers=1, num_heads=2, vocab_size=256)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hi", max_new_tokens=2)
    model.tokenizer = ByteTokenizer()
    torch.manual_seed(0)
    out = model.generate("hi", max_new_tokens=3, temperature=0)
    assert isinstance(out, str) and out.startswith("hi")
