"""Llama 3 RoPE frequency scaling (``model.rope_scaling``), both ways through the Hugging Face
format and checked against transformers itself; and plain RoPE left exactly as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from apt.core.config import ModelConfig
from apt.core.config.model import RopeScalingConfig
from apt.model import APTModel
from apt.model.interop import InteropError, from_hf, to_hf
from apt.model.layers.rope import RotaryEmbedding, inverse_frequencies

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
HEAD = 16  # hidden 64 / 4 heads
#: Scaled for 256 positions from 64: with head size 16 and theta 1e4 the 8 wavelengths are
#: 6.3, 20, 63, 199, ... positions, so the first is kept (< 64/4), the next two are blended
#: (16 .. 64) and the last five divided by the factor (> 64/1).
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SCALING = RopeScalingConfig(
    factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=64
)


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


def _hf_llama(folder: Path, **overrides: object) -> Path:
    """A tiny random LlamaForCausalLM with llama3 RoPE scaling (norms randomised too)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=dict(LLAMA3),
        tie_word_embeddings=False,
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


def _apt_model(**overrides: object) -> APTModel:
    torch.manual_seed(1)
    config = {
        "vocab_size": 300,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "max_seq_len": 256,
        "rope_theta": 10000.0,
        "rope_scaling": SCALING.model_dump(),
        **overrides,
    }
    return APTModel(ModelConfig.model_validate(config)).eval()


def _ids(length: int = 240) -> torch.Tensor:
    """Token ids reaching far past the original 64 positions, where the scaling matters."""
    return torch.randint(0, 300, (2, length), generator=torch.Generator().manual_seed(0))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------- the frequencies


def test_llama3_keeps_the_short_wavelengths_blends_the_band_and_divides_the_long() -> None:
    plain = inverse_frequencies(HEAD, 10000.0)
    scaled = inverse_frequencies(HEAD, 10000.0, SCALING)
    assert scaled[0] == plain[0]  # wavelength 6.3 < 64 / 4: kept
    assert torch.equal(scaled[3:], plain[3:] / 4.0)  # wavelengths > 64: divided by the factor
    blended = scaled[1:3] / plain[1:3]
    assert ((blended > 0.25) & (blended < 1.0)).all(), blended  # in between
    assert float((scaled - plain).abs().max()) > 0.01


def test_llama3_frequencies_are_transformers(tmp_path: Path) -> None:
    theirs = _load_hf(_hf_llama(tmp_path / "hf")).model.rotary_emb.inv_freq
    ours = inverse_frequencies(HEAD, 10000.0, SCALING)
    assert torch.allclose(ours.float(), theirs, rtol=1e-6, atol=0)


def test_plain_rope_tables_are_bit_identical_to_the_unscaled_formula() -> None:
    rope = RotaryEmbedding(HEAD, 256, 5000.0)
    # The tables APT built before scaling existed, computed here from the formula itself.
    exponent = torch.arange(0, HEAD, 2, dtype=torch.float64)
    angles = torch.outer(torch.arange(256, dtype=torch.float64), 5000.0 ** (-exponent / HEAD))
    assert torch.equal(rope.cos, angles.cos().float()) and torch.equal(
        rope.sin, angles.sin().float()
    )
    model = _apt_model(rope_scaling=None).bfloat16().float()  # rebuilt on every move, still exact
    angles = torch.outer(torch.arange(256, dtype=torch.float64), 1e4 ** (-exponent / HEAD))
    assert torch.equal(model.rope.cos, angles.cos().float())
    assert torch.equal(model.rope.sin, angles.sin().float())
    # So the logits are those of the unscaled tables, bit for bit.
    with torch.no_grad():
        logits = model(_ids()).logits
        model.rope.cos, model.rope.sin = angles.cos().float(), angles.sin().float()
        assert torch.equal(model(_ids()).logits, logits)


def test_scaled_tables_survive_meta_build_and_dtype_moves() -> None:
    cfg = _apt_model().config
    with torch.device("meta"):
        model = APTModel(cfg)
    model = model.to_empty(device="cpu").bfloat16()
    assert torch.equal(model.rope.cos, RotaryEmbedding(HEAD, 256, 1e4, SCALING).cos)
    assert not torch.equal(model.rope.cos, RotaryEmbedding(HEAD, 256, 1e4).cos)


# ---------------------------------------------------------------------------- the config


def test_rope_scaling_config_validates() -> None:
    cfg = ModelConfig.model_validate({"rope_scaling": {"factor": 8, "original_max_seq_len": 8192}})
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3"
    assert (cfg.rope_scaling.low_freq_factor, cfg.rope_scaling.high_freq_factor) == (1.0, 4.0)
    assert ModelConfig().rope_scaling is None
    with pytest.raises(ValidationError, match=r"high_freq_factor .* must exceed low_freq_factor"):
        RopeScalingConfig(factor=2, original_max_seq_len=64, low_freq_factor=4, high_freq_factor=4)
    with pytest.raises(ValidationError, match="original_max_seq_len"):
        ModelConfig.model_validate({"rope_scaling": {"factor": 8}})
    with pytest.raises(ValidationError, match="'llama3'"):
        RopeScalingConfig.model_validate({"kind": "yarn", "factor": 2, "original_max_seq_len": 8})


def test_rope_scaling_is_resume_critical() -> None:
    from apt.core.config import APTConfig
    from apt.core.config.resume import is_resume_critical

    for key in ("model.rope_scaling", "model.rope_scaling.factor", "model.rope_scaling.kind"):
        assert is_resume_critical(APTConfig, key), key


# ---------------------------------------------------------------------------- HF -> APT


def _to_v4_layout(folder: Path) -> Path:
    """The config.json transformers 4.x wrote (Llama 3.1's own): rope_scaling and rope_theta."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    del config["rope_parameters"]
    config.update(rope_theta=10000.0, rope_scaling=dict(LLAMA3))
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_from_hf_of_a_llama3_checkpoint_gives_the_logits_of_transformers(
    tmp_path: Path, layout: str
) -> None:
    folder = _hf_llama(tmp_path / "hf")
    if layout == "rope_scaling":
        _to_v4_layout(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert (layout in saved) and saved[layout]["rope_type"] == "llama3"
    ours, theirs = from_hf(folder).eval(), _load_hf(folder)
    assert ours.config.rope_scaling == SCALING and ours.config.rope_theta == 10000.0
    with torch.no_grad():
        expected = theirs(_ids()).logits
        diff = _max_diff(ours(_ids()).logits, expected)
        # The scaling matters at these positions: plain RoPE would be far off.
        ours.rope = RotaryEmbedding(HEAD, 256, 10000.0)
        unscaled = _max_diff(ours(_ids()).logits, expected)
    assert diff < ATOL
    assert unscaled > 100 * ATOL


def test_original_length_defaults_to_max_position_embeddings(tmp_path: Path) -> None:
    folder = _hf_llama(tmp_path / "hf")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    del config["rope_parameters"]["original_max_position_embeddings"]
    path.write_text(json.dumps(config))
    assert from_hf(folder).config.rope_scaling == SCALING.model_copy(
        update={"original_max_seq_len": 256}
    )


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling is set"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling is set"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters is set",
        ),
        (
            {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
            "rope_parameters is set",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4}},
            "rope_parameters is llama3 but misses low_freq_factor, high_freq_factor",
        ),
        (
            {"rope_parameters": {**LLAMA3, "low_freq_factor": 4.0}},
            "high_freq_factor (4.0) must exceed low_freq_factor (4.0)",
        ),
    ],
    ids=["linear", "dynamic", "yarn", "longrope", "llama3-incomplete", "llama3-empty-band"],
)
def test_from_hf_refuses_other_scalings(
    tmp_path: Path, block: dict[str, object], message: str
) -> None:
    folder = _hf_llama(tmp_path / "hf")
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")
    config.update(block)
    path.write_text(json.dumps(config))
    with pytest.raises(InteropError, match="APT cannot import this model") as err:
        from_hf(folder)
    assert message in str(err.value) and str(folder) in str(err.value)
    if "is set" in message:
        assert "no frequency scaling but llama3's (not linear, dynamic, yarn" in str(err.value)


# ---------------------------------------------------------------------------- APT -> HF


def test_to_hf_with_llama3_scaling_loads_in_transformers_with_the_same_logits(
    tmp_path: Path,
) -> None:
    model = _apt_model()
    out = to_hf(model, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA3  # transformers 4.x reads this one
    assert config["rope_parameters"] == {**LLAMA3, "rope_theta": 10000.0}  # and 5.x this one
    theirs = _load_hf(out)
    assert torch.allclose(
        theirs.model.rotary_emb.inv_freq, inverse_frequencies(HEAD, 1e4, SCALING).float()
    )
    with torch.no_grad():
        assert _max_diff(model(_ids()).logits, theirs(_ids()).logits) < ATOL
    prompt = _ids()[:1, :100]
    greedy = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=None,
    )
    assert greedy.tolist() == model.generate(prompt, 16, temperature=0).tolist()


def test_round_trip_keeps_the_scaling(tmp_path: Path) -> None:
    model = _apt_model()
    back = from_hf(to_hf(model, tmp_path / "hf"))
    width = {"intermediate_size": model.config.mlp_hidden_size}
    assert back.config == model.config.model_copy(update=width)
    assert back.config.rope_scaling == SCALING
    assert torch.equal(back.rope.cos, model.rope.cos)
    mine, theirs = model.state_dict(), back.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_plain_export_writes_plain_rope(tmp_path: Path) -> None:
    config = json.loads(
        (to_hf(_apt_model(rope_scaling=None), tmp_path / "hf") / "config.json").read_text()
    )
    assert config["rope_scaling"] is None
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert from_hf(tmp_path / "hf").config.rope_scaling is None
