"""1.x profile fields (seed 000): ``schedules``, the plugin list and the provider names, mapped
onto the 2.0 config or refused with what replaces them."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from apt.core.config import APTConfig
from apt.core.errors import ConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from apt_model.config import from_yaml, translate_legacy

TINY_MODEL = "hidden_size: 32\n  num_layers: 2\n  num_heads: 2\n  max_seq_len: 32"

LEGACY = f"""\
plugins: [moe, routing, align, voter]
model:
  {TINY_MODEL}
  attention_name: default
  ffn_name: default
  router_name: topk_default
data:
  seq_len: 32
training:
  max_steps: 4
schedules:
  enable_moe_at_epoch: 2
  enable_align_at_epoch: 3
  route_temp: {{start: 1.5, end: 0.8, by: epoch}}
  moe_capacity: {{start: 1.5, end: 1.1, by: epoch}}
  align_weight: {{start: 0.0, end: 0.3, by: step, warmup: 5000}}
"""


def write(tmp_path: Path, text: str, name: str = "legacy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_1x_profile_loads_as_the_2_0_config(tmp_path: Path) -> None:
    cfg = from_yaml(write(tmp_path, LEGACY))
    assert type(cfg) is APTConfig
    # plugins -> the model sections; a plugin that a schedule switches on starts off
    assert cfg.model.moe is not None and cfg.model.moe.enabled is False
    assert cfg.model.align is not None and cfg.model.align.enabled is False
    assert cfg.model.voter is not None and cfg.model.voter.enabled is True
    # schedules: the same entries
    assert cfg.schedules.root["enable_moe_at_epoch"] == 2
    align = cfg.schedules.root["align_weight"]
    assert (align.start, align.end, align.by, align.warmup) == (0.0, 0.3, "step", 5000)  # type: ignore[union-attr]
    assert cfg.training.max_steps == 4


def test_overrides_apply_to_a_translated_profile(tmp_path: Path) -> None:
    cfg = from_yaml(write(tmp_path, LEGACY), overrides=["training.max_steps=9"])
    assert cfg.training.max_steps == 9


def test_a_2_0_profile_loads_exactly_as_apt_loads_it(tmp_path: Path) -> None:
    text = f"model:\n  {TINY_MODEL}\ndata:\n  seq_len: 32\ntraining:\n  max_steps: 3\n"
    path = write(tmp_path, text, "new.yaml")
    ours, theirs = from_yaml(path), APTConfig.from_yaml(path)
    assert ours == theirs and ours.provenance == theirs.provenance
    assert ours.origin_of("training.max_steps") == f"{path}:9"


def test_translate_maps_plugins_and_drops_default_providers() -> None:
    data = {
        "plugins": ["moe", "voter"],
        "attention_name": "default",  # 1.x also had the fields at the top level
        "model": {"voter": {"entropy_threshold": 3.0}, "moe": {"enabled": False}},
        "schedules": {"enable_voter_at_step": 10},
    }
    assert translate_legacy(data) == {
        "model": {"voter": {"entropy_threshold": 3.0}, "moe": {"enabled": False}},
        "schedules": {"enable_voter_at_step": 10},
    }
    assert data["plugins"] == ["moe", "voter"]  # the input is left alone
    assert translate_legacy({"plugins": ["align"]}) == {"model": {"align": {"enabled": True}}}
    plain = {"model": {"hidden_size": 64}, "training": {"max_steps": 1}}
    assert translate_legacy(plain) == plain


def test_fields_without_a_2_0_equivalent_are_refused_with_their_replacement(tmp_path: Path) -> None:
    text = LEGACY.replace("attention_name: default", "attention_name: tva_default").replace(
        "plugins: [moe, routing, align, voter]", "plugins: [moe, grpo]"
    )
    with pytest.raises(ConfigError) as err:
        from_yaml(write(tmp_path, text))
    message = str(err.value)
    assert "legacy.yaml: APT 1.x fields without an APT 2.0 equivalent" in message
    assert "model.attention_name: 'tva_default' has no APT 2.0 equivalent" in message
    assert "model.num_kv_heads" in message and "Remove model.attention_name" in message
    assert "plugins: 'grpo' has no APT 2.0 equivalent" in message
    assert "model.moe, model.align, model.voter" in message and "callbacks:" in message


@pytest.mark.parametrize(
    "field, value, replacement",
    [
        ("ffn_name", "moe_ffn", "SwiGLU MLP (model.intermediate_size)"),
        ("router_name", "expert_choice", "model.moe.top_k"),
        ("align_name", "bistate_default", "model.align.loss_weight"),
        ("retrieval_name", "faiss", "no retrieval provider"),
    ],
)
def test_each_provider_name_says_what_replaces_it(field: str, value: str, replacement: str) -> None:
    pattern = rf"model.{field}: '{value}' has no APT 2.0 .*{re.escape(replacement)}"
    with pytest.raises(ConfigError, match=pattern):
        translate_legacy({"model": {field: value}}, where="x.yaml")


def test_a_plugin_list_that_is_not_a_list_of_names_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"plugins: must be a list of plugin names, got 'moe'"):
        translate_legacy({"plugins": "moe"})


def test_other_1x_keys_get_the_2_0_schema_message(tmp_path: Path) -> None:
    text = LEGACY.replace("hidden_size: 32", "d_model: 32")
    with pytest.raises(ConfigError, match=r"model.d_model: unknown key"):
        from_yaml(write(tmp_path, text))


def test_1x_fields_in_a_profile_and_its_parent_are_both_translated(tmp_path: Path) -> None:
    parent = f"plugins: [voter]\nmodel:\n  {TINY_MODEL}\ndata:\n  seq_len: 32\n"
    (tmp_path / "parent.yaml").write_text(parent)
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\nplugins: [align]\nmodel:\n  ffn_name: default\n")
    cfg = APTConfig.from_yaml(child)
    assert cfg.model.voter is not None and cfg.model.voter.enabled
    assert cfg.model.align is not None and cfg.model.align.enabled
    assert cfg.model.hidden_size == 32


def test_a_refused_1x_value_in_a_parent_names_the_parent_and_the_extends(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text("router_name: expert_choice\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"(?s)parent.yaml.*router_name.*named by extends: at"):
        APTConfig.from_yaml(child)


def test_load_profile_stays_strict_about_1x_fields(tmp_path: Path) -> None:
    from apt.core.config import load_profile

    with pytest.raises(ConfigError, match=r"plugins"):
        load_profile(write(tmp_path, LEGACY))


def test_legacy_from_yaml_is_apt_config_from_yaml() -> None:
    assert from_yaml == APTConfig.from_yaml


def test_apt_config_from_yaml_itself_reads_1x_fields(tmp_path: Path) -> None:
    cfg = APTConfig.from_yaml(write(tmp_path, LEGACY))
    assert cfg.model.moe is not None
