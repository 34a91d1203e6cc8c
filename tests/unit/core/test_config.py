"""Config loading: every kind of bad input gives a ConfigError that names file, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from apt.core.config import APTConfig, list_profiles, load_profile
from apt.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SEED_EXAMPLE = """\
training:
  batch_size: 32
  learning_rate: 3e-5
  max_steps: 10000

  distributed:
    enabled: true
    strategy: fsdp
    world_size: 8

  checkpoints:
    save_interval: 500
    keep_last_n: 5
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_profile(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_seed_example_profile_validates_and_means_what_it_says(tmp_path: Path) -> None:
    cfg = load_profile(write(tmp_path / "my_training.yaml", SEED_EXAMPLE))
    t = cfg.training
    assert (t.batch_size, t.learning_rate, t.max_steps) == (32, 3e-5, 10000)
    assert isinstance(t.learning_rate, float)
    assert (t.distributed.enabled, t.distributed.strategy, t.distributed.world_size) == (
        True,
        "fsdp",
        8,
    )
    assert (t.checkpoints.save_interval, t.checkpoints.keep_last_n) == (500, 5)


@pytest.mark.parametrize("path", sorted((REPO / "profiles").rglob("*.y*ml")), ids=lambda p: p.name)
def test_every_shipped_profile_validates(path: Path) -> None:
    cfg = load_profile(path)
    assert cfg.source == str(path)


def test_profiles_resolve_from_package_in_any_folder(in_tmp: Path) -> None:
    assert {"quickstart", "standard"} <= set(list_profiles())
    assert load_profile("standard").model.hidden_size == 768


def test_search_order_local_then_env_then_package(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = in_tmp / "extra"
    write(extra / "standard.yaml", "training: {max_steps: 7}\n")
    monkeypatch.setenv("APT_PROFILE_PATH", str(extra))
    assert load_profile("standard").training.max_steps == 7
    write(in_tmp / "profiles" / "standard.yaml", "training: {max_steps: 3}\n")
    assert load_profile("standard").training.max_steps == 3


def test_unknown_key_names_file_line_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "training:\n  max_steps: 5\n  learning_rat: 0.1\n")
    message = error_of(path)
    assert "training.learning_rat" in message
    assert "Did you mean 'learning_rate'" in message
    assert f"{path}:3" in message


def test_wrong_type_names_key_and_expected(tmp_path: Path) -> None:
    message = error_of(write(tmp_path / "t.yaml", "training: {max_steps: many}\n"))
    assert "training.max_steps" in message and "valid integer" in message and "'many'" in message


def test_yaml_syntax_error_gives_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", "training:\n  max_steps: 5\n  bad: [1, 2\n")
    message = error_of(path)
    assert str(path) in message and "invalid YAML" in message
    assert f"{path}:4" in message or f"{path}:3" in message


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "d.yaml", "training:\n  max_steps: 5\n  max_steps: 6\n")
    message = error_of(path)
    assert "duplicate key 'max_steps'" in message and f"{path}:3" in message and "line 2" in message


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "u.yaml", "training: !!python/object/apply:os.system ['echo hi']\n")
    assert "invalid YAML" in error_of(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping" in error_of(write(tmp_path / "l.yaml", "- 1\n- 2\n"))


def test_missing_profile_lists_close_names(in_tmp: Path) -> None:
    message = error_of("quickstrat")
    assert "not found" in message and "quickstart" in message


def test_extends_deep_merges_and_tracks_provenance(tmp_path: Path) -> None:
    write(
        tmp_path / "base.yaml",
        "training:\n  max_steps: 10\n  batch_size: 4\nmodel: {hidden_size: 64}\n",
    )
    child = write(tmp_path / "child.yaml", "extends: base\ntraining:\n  batch_size: 2\n")
    cfg = load_profile(child, overrides=["model.num_layers=3"])
    assert (cfg.training.max_steps, cfg.training.batch_size, cfg.model.hidden_size) == (10, 2, 64)
    assert cfg.origin_of("training.max_steps") == f"{tmp_path / 'base.yaml'}:2"
    assert cfg.origin_of("training.batch_size") == f"{child}:3"
    assert cfg.origin_of("model.num_layers") == "--set model.num_layers=3"
    assert cfg.origin_of("training.seed") == "default"


def test_extends_cycle_is_detected(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "extends: b\ntraining: {max_steps: 1}\n")
    write(tmp_path / "b.yaml", "extends: a\n")
    assert "cycle" in error_of(tmp_path / "a.yaml")


def test_changing_a_union_kind_replaces_the_parent_mapping(tmp_path: Path) -> None:
    write(
        tmp_path / "p.yaml",
        "training:\n  max_steps: 5\n  scheduler: {type: cosine, min_lr_ratio: 0.2}\n",
    )
    child = write(
        tmp_path / "c.yaml", "extends: p\ntraining:\n  scheduler: {type: step, step_size: 2}\n"
    )
    sched = load_profile(child).training.scheduler
    assert sched.type == "step" and sched.step_size == 2


def test_overrides_are_parsed_by_field_type(in_tmp: Path) -> None:
    cfg = load_profile(
        "quickstart",
        overrides=[
            "training.lr=3e-4",
            "training.compile=true",
            "artifacts.experiment_name=007",
            "training.max_grad_norm=null",
            "training.optimizer.betas=[0.8, 0.9]",
        ],
    )
    assert cfg.training.learning_rate == 3e-4
    assert cfg.training.compile is True
    assert cfg.artifacts.experiment_name == "007"
    assert cfg.training.max_grad_norm is None
    assert cfg.training.optimizer.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.max_steps", "must look like section.key=value"),
        ("trainin.max_steps=3", "Did you mean 'training'"),
        ("training.precision=fp8", "'fp32', 'bf16' or 'fp16'"),
        ("training.optimizer.kind=lion", "'adamw', 'adam', 'sgd'"),
        ("training.distributed.enabled=false", "enabled is false but strategy"),
    ],
)
def test_bad_overrides(in_tmp: Path, override: str, expected: str) -> None:
    overrides = [override]
    if "enabled=false" in override:
        overrides.insert(0, "training.distributed.strategy=ddp")
    assert expected in error_of("quickstart", overrides=overrides)


def test_schedules_are_checked_against_the_model(in_tmp: Path) -> None:
    message = error_of("quickstart", overrides=["schedules.enable_moe_at_epoch=2"])
    assert "schedules.enable_moe_at_epoch" in message and "no module 'moe'" in message
    message = error_of(
        "quickstart", overrides=["model.moe={}", "schedules.route_tmp={start: 1, end: 2}"]
    )
    assert "route_tmp" in message and "route_temp" in message and "router.temperature" in message


def test_config_is_frozen_and_fingerprinted(in_tmp: Path) -> None:
    a, b = load_profile("quickstart"), load_profile("quickstart")
    assert a.fingerprint() == b.fingerprint()
    assert (
        a.fingerprint() != load_profile("quickstart", overrides=["training.seed=1"]).fingerprint()
    )
    with pytest.raises(Exception, match="frozen"):
        a.training.max_steps = 3  # type: ignore[misc]


def test_from_yaml_and_presets(tmp_path: Path) -> None:
    cfg = APTConfig.from_yaml(
        write(
            tmp_path / "p.yaml",
            "model: {preset: small, num_layers: 2}\ntraining: {num_epochs: 1}\n",
        )
    )
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (768, 2)
