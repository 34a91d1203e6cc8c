"""The Hugging Face format both ways, checked against transformers itself: from_hf of a
LlamaForCausalLM and to_hf of an APTModel give the same logits, tokens and generations."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt.core.config import ModelConfig
from apt.model import APTModel
from apt.model.interop import InteropError, from_hf, to_hf
from apt.model.tokenizers import ByteTokenizer, JSONTokenizer

transformers = pytest.importorskip("transformers")

#: fp32 logits of the two implementations differ by float rounding only (measured: < 1e-6).
ATOL = 1e-5
TEXTS = [
    "def main(argv):\n    return 0\n",
    "héllo wörld — ĀĒĪ 日本語 🎉",
    "a<|endoftext|>b <|pad|>",
    "  leading and trailing spaces  \r\n\t",
    "<0x41> is not a byte token",
]


def _hf_llama(folder: Path, *, tie: bool, **overrides: object) -> Path:
    """A tiny random LlamaForCausalLM (norm weights randomised too), saved into ``folder``."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **overrides,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def _load_hf(folder: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    return model.eval()


def _apt_model(tokenizer: object, *, tie: bool = True, **overrides: object) -> APTModel:
    torch.manual_seed(1)
    config = {
        "vocab_size": 320,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_seq_len": 64,
        "rope_theta": 5000.0,
        "tie_embeddings": tie,
        **overrides,
    }
    model = APTModel(ModelConfig.model_validate(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.tokenizer = tokenizer  # type: ignore[assignment]
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> JSONTokenizer:
    """A 300-id byte-level BPE trained on this file."""
    from apt.trainops.data.bpe import train_bpe

    folder = tmp_path_factory.mktemp("bpe")
    (folder / "text.txt").write_text(Path(__file__).read_text() * 3, encoding="utf-8")
    path = train_bpe([str(folder / "*.txt")], vocab_size=300, output=folder / "tok")
    return JSONTokenizer(path, kind="bpe")


@pytest.fixture(autouse=True)
def _fp32_threads() -> None:
    torch.set_num_threads(2)


# ---------------------------------------------------------------------------- HF -> APT


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_from_hf_gives_the_logits_of_transformers(tmp_path: Path, tie: bool) -> None:
    folder = _hf_llama(tmp_path / "hf", tie=tie)
    ours = from_hf(folder).eval()
    theirs = _load_hf(folder)
    assert ours.config.tie_embeddings is tie and ours.config.kv_heads == 2
    assert (ours.lm_head.weight is ours.embed_tokens.weight) is tie
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = _max_diff(ours(ids).logits, theirs(ids).logits)
    assert diff < ATOL
    assert ours.tokenizer is None  # save_pretrained of a bare model writes no tokenizer


def test_from_hf_reads_a_sharded_checkpoint(tmp_path: Path) -> None:
    folder = _hf_llama(tmp_path / "hf", tie=False)
    theirs = _load_hf(folder)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ours, one_file = from_hf(tmp_path / "sharded"), from_hf(folder)
    for name, tensor in one_file.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_from_hf_accepts_mistral_without_a_sliding_window(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=64,
        sliding_window=None,
    )
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "mistral")
    ids = torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        diff = _max_diff(
            from_hf(tmp_path / "mistral")(ids).logits, _load_hf(tmp_path / "mistral")(ids).logits
        )
    assert diff < ATOL


def _edit_config(folder: Path, **changes: object) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 8.0}},
            "RoPE has no frequency scaling but llama3's",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters is set",
        ),
        ({"model_type": "qwen2"}, "q/k/v biases"),
        ({"model_type": "gpt_neox"}, "'gpt_neox' is not a Llama-shaped model"),
        ({"attention_bias": True}, "attention_bias is true"),
        ({"mlp_bias": True}, "mlp_bias is true"),
        ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
        ({"head_dim": 32}, "head_dim is 32, not hidden_size / num_attention_heads = 64/4"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window is 16"),
        ({"num_hidden_layers": 3}, "missing: model.layers.2."),
        (
            {"intermediate_size": 96},
            "wrong shape: model.layers.0.mlp.gate_proj.weight (128, 64) (config: (96, 64))",
        ),
    ],
    ids=lambda v: "" if isinstance(v, str) else next(iter(v)),
)
def test_from_hf_refuses_another_network(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    folder = _edit_config(_hf_llama(tmp_path / "hf", tie=True), **changes)
    with pytest.raises(InteropError, match=r"APT cannot import|Nothing was loaded") as err:
        from_hf(folder)
    assert message in str(err.value)
    assert str(folder) in str(err.value) and err.value.exit_code == 2
    assert isinstance(err.value, ValueError)


def test_from_hf_refuses_biases_and_missing_tensors(tmp_path: Path) -> None:
    folder = _hf_llama(tmp_path / "hf", tie=True)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, weights)
    with pytest.raises(
        InteropError, match=r"unexpected: model.layers.0.self_attn.q_proj.bias.*biases"
    ):
        from_hf(folder)
    del state["model.norm.weight"]
    save_file(state, weights)
    with pytest.raises(InteropError, match=r"missing: model.norm.weight"):
        from_hf(folder)


def test_from_hf_never_downloads_and_never_unpickles(tmp_path: Path) -> None:
    with pytest.raises(InteropError, match="never downloads: download the checkpoint first"):
        from_hf(tmp_path / "meta-llama" / "Llama-3.2-1B")
    folder = _hf_llama(tmp_path / "hf", tie=True)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(InteropError, match=r"pytorch_model.bin: PyTorch pickles.*never unpickles"):
        from_hf(folder)


# ---------------------------------------------------------------------------- APT -> HF


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_to_hf_loads_in_transformers_with_the_same_logits_tokens_and_generations(
    tmp_path: Path, bpe: JSONTokenizer, tie: bool
) -> None:
    model = _apt_model(bpe, tie=tie)
    out = to_hf(model, tmp_path / "hf")
    theirs = _load_hf(out)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == bpe.eos_id == 0 and config["pad_token_id"] == 1
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tie

    ids = torch.tensor([bpe.encode(TEXTS[0] * 3)[:60]])
    with torch.no_grad():
        assert _max_diff(model(ids).logits, theirs(ids).logits) < ATOL

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|endoftext|>",
        0,
        "<|pad|>",
        1,
    )
    assert tok.model_max_length == 64
    for text in TEXTS:
        assert tok(text)["input_ids"] == bpe.encode(text), text
        assert tok.decode(bpe.encode(text)) == bpe.decode(bpe.encode(text))

    prompt = ids[:, :8]
    ours = model.generate(prompt, 24, temperature=0)
    hf_out = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,  # APT's generate does not stop at the end of text
    )
    assert hf_out.tolist() == ours.tolist()


def test_the_byte_tokenizer_exports_to_the_same_ids(tmp_path: Path) -> None:
    out = to_hf(_apt_model(ByteTokenizer(), vocab_size=256), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("\x00", 0, None)
    every_char = "".join(chr(c) for c in range(1, 0x11000, 7) if not 0xD800 <= c < 0xE000)
    for text in [*TEXTS, "nul\x00inside", "\x00", every_char, "Ā", "<0x00>"]:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8")), text[:20]
        assert tok.decode(ids) == text
    back = from_hf(out)
    assert isinstance(back.tokenizer, ByteTokenizer)


def test_round_trip_is_bit_identical(tmp_path: Path, bpe: JSONTokenizer) -> None:
    for tie in (True, False):
        model = _apt_model(bpe, tie=tie)
        back = from_hf(to_hf(model, tmp_path / f"hf-{tie}"))
        # The same config, with the MLP width the default stood for written out.
        width = {"intermediate_size": model.config.mlp_hidden_size}
        assert back.config == model.config.model_copy(update=width)
        mine, theirs = model.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert (back.lm_head.weight is back.embed_tokens.weight) is tie
        assert isinstance(back.tokenizer, JSONTokenizer) and back.tokenizer.name == "bpe"
        assert back.tokenizer.encode(TEXTS[1]) == bpe.encode(TEXTS[1])
    # bf16 on the way out: the import widens it back exactly.
    half = from_hf(to_hf(model, tmp_path / "bf16", dtype=torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert torch.equal(half.norm.weight, model.norm.weight.bfloat16().float())


def test_from_hf_reads_the_eos_of_a_foreign_tokenizer_folder(
    tmp_path: Path, bpe: JSONTokenizer
) -> None:
    folder = _hf_llama(tmp_path / "hf", tie=True)
    bpe.save(folder)  # a tokenizer.json without APT's apt_tokenizer.json
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    tokenizer = from_hf(folder).tokenizer
    assert isinstance(tokenizer, JSONTokenizer) and tokenizer.name == "hf"
    assert (tokenizer.eos_token, tokenizer.eos_id) == ("<|end|>", 5)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"moe": {"num_experts": 4}}, "model.moe: 2 block(s) (blocks.0.mlp, blocks.1.mlp)"),
        ({"align": {"enabled": True}}, "model.align: the model carries the align loss"),
        ({"voter": {}}, "model.voter: the voter changes how tokens are chosen"),
    ],
    ids=["moe", "align", "voter"],
)
def test_to_hf_refuses_modules_llama_has_not(
    tmp_path: Path, section: dict[str, object], message: str
) -> None:
    with pytest.raises(InteropError) as err:
        to_hf(_apt_model(None, **section), tmp_path / "hf")
    assert message in str(err.value) and isinstance(err.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left


def test_to_hf_writes_all_or_nothing(tmp_path: Path, bpe: JSONTokenizer) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InteropError, match=r"could not export the model to .*file.*left as it was"):
        to_hf(_apt_model(None), tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(
        InteropError, match=r"has 300 ids, more than the model's vocab_size \(256\)"
    ):
        to_hf(_apt_model(bpe, vocab_size=256), tmp_path / "small-vocab")
    out = tmp_path / "hf"
    to_hf(_apt_model(bpe), out)
    (out / "README.md").write_text("mine")
    to_hf(_apt_model(None), out)  # no tokenizer now: the old tokenizer files go, README stays
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------- the CLI


def _export(*argv: str) -> int:
    from apt.cli.export_cmd import add_export_parser, cmd_export

    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    return cmd_export(parser.parse_args(["export", *argv]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from apt.core.config import load_profile
    from apt.trainops.engine import Trainer

    root = tmp_path_factory.mktemp("runs")
    overrides = ["training.max_steps=2", f"artifacts.output_dir={root}"]
    Trainer.from_config(load_profile("cpu/tiny", overrides=overrides)).train()
    return root / "tiny"


def test_cli_exports_a_runs_final_model(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _export(str(run_dir), "--output", str(tmp_path / "hf")) == 0
    assert "-> " in capsys.readouterr().out
    ours = APTModel.from_pretrained(run_dir / "final_model").eval()
    theirs = _load_hf(tmp_path / "hf")
    ids = torch.tensor([ByteTokenizer().encode("import os\nimport sys\n")])
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, theirs(ids).logits) < ATOL
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("import os")["input_ids"] == list(b"import os")

    # The model folder itself, and the APT format; and the Hugging Face folder back to APT.
    model_dir = str(run_dir / "final_model")
    assert _export(model_dir, "--format", "apt", "-o", str(tmp_path / "apt")) == 0
    assert _export(str(tmp_path / "hf"), "--format", "apt", "-o", str(tmp_path / "back")) == 0
    for folder in ("apt", "back"):
        again = APTModel.from_pretrained(tmp_path / folder).state_dict()
        assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())
    assert _export(model_dir, "--dtype", "bfloat16", "-o", str(tmp_path / "bf16")) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_errors_name_the_folder(tmp_path: Path, run_dir: Path) -> None:
    from apt.core.errors import ConfigError

    with pytest.raises(ConfigError, match="no such folder") as err:
        _export(str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert err.value.exit_code == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"not a model folder .* nor a run folder"):
        _export(str(tmp_path / "empty"), "-o", str(tmp_path / "out"))
    final = run_dir / "final_model"
    with pytest.raises(ConfigError, match="is the source folder"):
        _export(str(final), "-o", str(final))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    assert _export(str(bad), "-o", str(tmp_path / "out")) == 2  # CheckpointError: one line
