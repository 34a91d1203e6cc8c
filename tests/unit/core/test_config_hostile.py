"""Hostile config input: files that are not profiles, credentials, YAML bombs, values that would
only fail once training starts, names that become paths. Each is a ConfigError that names the
file (and line) or the dotted key, and never echoes what it must not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from apt.core.config import load_profile, yaml_io
from apt.core.config.data import TOKENIZER_VOCAB, vocab_mismatch
from apt.core.config.devices import check_device_present, is_device_form
from apt.core.config.yaml_io import MAX_BYTES, parse_yaml
from apt.core.errors import APTError, ConfigError, DataError
from apt.core.redact import MASK, redact

SECRET = "hunter2secret"
PROFILE_KEYS = (
    "artifacts, callbacks, data, eval, extends, finetune, model, monitoring, schedules, training"
)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def error_of(target: object, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_profile(target, overrides=overrides)  # type: ignore[arg-type]
    return str(info.value)


def child_of(tmp_path: Path, parent: Path) -> Path:
    return write(tmp_path / "child.yaml", f"extends: {parent}\ntraining: {{max_steps: 1}}\n")


# --- 1. files that are not profiles -------------------------------------------------------

NOT_PROFILES = {
    "passwd_lines": (
        f"root:x:0:0:{SECRET}:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\n",
        "its top level is a single value",
    ),
    # The trailing ":" makes the line a mapping key: still not a profile, still not quoted.
    "shadow_lines": (f"root:$6${SECRET}$abc:19000:0:99999:7:::\n", "its top level has none of"),
    "env_file_as_mapping": (
        f"DB_PASSWORD: {SECRET}\nAPI_{SECRET}: abc\n",
        f"its top level has none of the keys a profile may have ({PROFILE_KEYS})",
    ),
    "duplicate_unknown_keys": (
        f"{SECRET}: a\n{SECRET}: b\n",
        "its top level has none of the keys a profile may have",
    ),
    "yaml_list": (f"- {SECRET}\n- {{password: {SECRET}}}\n", "its top level is a list"),
    "undefined_alias": (f"password: *{SECRET}\n", "found undefined alias"),
    "custom_tag": (f"training: !{SECRET} x\n", "could not determine a constructor"),
    "unclosed_quote": (f'pass: "{SECRET}\n', "invalid YAML"),
}


@pytest.mark.parametrize("via_extends", [False, True], ids=["direct", "extends"])
@pytest.mark.parametrize("name", sorted(NOT_PROFILES))
def test_a_file_that_is_not_a_profile_is_named_never_quoted(
    tmp_path: Path, name: str, via_extends: bool
) -> None:
    text, problem = NOT_PROFILES[name]
    path = write(tmp_path / f"{name}.txt", text)
    message = error_of(child_of(tmp_path, path) if via_extends else path)
    assert str(path) in message and problem in message
    assert SECRET not in message and "password" not in message.lower()
    if via_extends:
        assert f"(named by extends: at {tmp_path / 'child.yaml'}:1)" in message


@pytest.mark.parametrize(
    "junk, problem",
    [
        (bytes(range(128, 256)) * 8, "not UTF-8 text (byte 0 cannot be decoded)"),
        (b"\x89PNG\r\n\x1a\n" + bytes(500), "not UTF-8 text (byte 0"),
        (b"HOME=/root\x00TOKEN=" + SECRET.encode() + b"\x00", "special characters are not allowed"),
        (b"a: b\x01c\n", "special characters are not allowed (character 4)"),
    ],
    ids=["high_bytes", "png", "proc_environ", "control_char"],
)
def test_binary_junk_is_refused_by_file(tmp_path: Path, junk: bytes, problem: str) -> None:
    path = write(tmp_path / "junk.bin", junk)
    for target in (path, child_of(tmp_path, path)):
        message = error_of(target)
        assert str(path) in message and problem in message and SECRET not in message


def test_a_real_profile_with_a_misspelled_section_still_gets_a_hint(tmp_path: Path) -> None:
    parent = write(tmp_path / "parent.yaml", "model: {hidden_size: 64}\ntrainig: {max_steps: 2}\n")
    message = error_of(child_of(tmp_path, parent))
    assert "trainig: unknown key. Did you mean 'training'?" in message
    assert f"[{parent}:2]" in message


def test_empty_and_extends_only_files_are_profiles(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.yaml", "")
    assert load_profile(child_of(tmp_path, empty)).training.max_steps == 1
    only = write(tmp_path / "only.yaml", "extends: quickstart\n")
    assert load_profile(only).model.hidden_size == load_profile("quickstart").model.hidden_size


def test_long_values_are_cut_in_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "long.yaml", f"training: {{max_steps: '{'x' * 5000}'}}\n")
    message = error_of(path)
    assert "training.max_steps" in message and "x" * 100 not in message and len(message) < 600


# --- 2. credentials -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, shown",
    [
        ("https://alice:pw@example.com/x", "https://alice:***@example.com/x"),
        ("got 's3://AKIA:abc/def+g@bucket/key'", "got 's3://AKIA:***@bucket/key'"),
        ("x=https://user:p@ss@host/path", "x=https://user:***@host/path"),
        ("git+ssh://ghp_token123@github.com/o/r", "git+ssh://***@github.com/o/r"),
        ("'nosep_https://u:pw@h' and http://x:y@z", "'nosep_https://u:***@h' and http://x:***@z"),
        ("https://h/d?token=abc&page=2", "https://h/d?token=***&page=2"),
        ("?X-Amz-Signature=ab12&X-Amz-Date=1", "?X-Amz-Signature=***&X-Amz-Date=1"),
        ("host=h password=pw1 user=u", "host=h password=*** user=u"),
        ("[--set a.api_key=k1]", "[--set a.api_key=***]"),
        ("(access_token=t, client_secret=s)", "(access_token=***, client_secret=***)"),
    ],
)
def test_redact_hides_secrets(text: str, shown: str) -> None:
    assert redact(text) == shown
    assert redact(shown) == shown  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "data.tokenizer=byte",
        "max_tokens=5",
        "https://example.com/@user",
        "https://host:8080/path",
        "mailto:a@b.com",
        "training.learning_rate: Input should be greater than 0 (got -1)",
    ],
)
def test_redact_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_every_apt_error_is_redacted() -> None:
    for cls in (APTError, ConfigError, DataError):
        assert str(cls(f"cannot read https://u:{SECRET}@h")) == f"cannot read https://u:{MASK}@h"


@pytest.mark.parametrize(
    "override",
    [
        f"training.seed=https://user:{SECRET}@host/x",
        f"training.lr=postgres://a:{SECRET}@c/db",
        f"training.optimizer.betas=[https://u:{SECRET}@h, 0.9]",
        f"training.max_steps=https://h/x?token={SECRET}",
        f"https://u:{SECRET}@h=1",
        f"no_equals_sign_https://u:{SECRET}@h",
    ],
)
def test_a_refused_override_never_shows_its_password(in_tmp: Path, override: str) -> None:
    message = error_of("quickstart", [override])
    assert SECRET not in message and MASK in message


def test_provenance_of_an_override_is_redacted(in_tmp: Path) -> None:
    cfg = load_profile("quickstart", [f"artifacts.output_dir=https://u:{SECRET}@h/runs"])
    assert cfg.artifacts.output_dir == f"https://u:{SECRET}@h/runs"  # the value itself is kept
    assert (
        cfg.origin_of("artifacts.output_dir")
        == f"--set artifacts.output_dir=https://u:{MASK}@h/runs"
    )


# --- 3. YAML bombs, recursion, complex keys, size -----------------------------------------


def _laughs(levels: int, width: int = 10) -> str:
    lines = ["training: {max_steps: 1}", "l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_quickly_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.yaml", _laughs(9))  # 10**9 leaves
    assert path.stat().st_size < 1024
    start = time.monotonic()
    message = error_of(path)
    assert time.monotonic() - start < 5
    assert f"{path}:6:" in message  # l4, 10**5 leaves: the first value over the limit
    assert "more than 100,000 YAML nodes" in message and "extends:" in message


def test_node_limit_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yaml_io, "MAX_NODES", 11)
    assert parse_yaml("[" + ", ".join("1" * 10) + "]", "t") == [1] * 10  # 1 list + 10 = 11
    with pytest.raises(ConfigError, match=r"^t:1: this value holds more than 11 YAML nodes"):
        parse_yaml("[" + ", ".join("1" * 11) + "]", "t")
    with pytest.raises(ConfigError, match="more than 11"):  # aliases count as copies
        parse_yaml("a: &a [1, 2, 3]\nb: [*a, *a]\n", "t")


@pytest.mark.parametrize(
    "text, line",
    [
        ("training: {max_steps: 1}\na: &a [*a]\n", 2),
        ("training: {max_steps: 1}\na: &a {b: [1, {c: *a}]}\n", 2),
        ("training: {max_steps: 1}\na: &a\n  <<: *a\n", 2),
        ("training: {max_steps: 1}\nx:\n  - &a [1, [2, *a]]\n", 3),
    ],
    ids=["list", "nested_mapping", "merge_key", "in_list"],
)
def test_recursive_aliases_are_refused(tmp_path: Path, text: str, line: int) -> None:
    path = write(tmp_path / "rec.yaml", text)
    message = error_of(path)
    assert (
        message.startswith(f"{path}:{line}: recursive alias") and "write the value out" in message
    )


@pytest.mark.parametrize(
    "text, kind, line",
    [
        ("training: {max_steps: 1}\n? [a, b]\n: 1\n", "list", 2),
        ("training: {max_steps: 1}\n? {a: 1}\n: 1\n", "mapping", 2),
        ("training:\n  max_steps: 1\n  [x]: 2\n", "list", 3),
        ("training: {max_steps: 1}\nl: [{[1]: 2}]\n", "list", 2),
    ],
)
def test_non_scalar_keys_are_refused(tmp_path: Path, text: str, kind: str, line: int) -> None:
    path = write(tmp_path / "keys.yaml", text)
    assert error_of(path).startswith(
        f"{path}:{line}: a mapping key is a {kind}; keys must be plain"
    )


def test_size_limit(tmp_path: Path) -> None:
    head = "training: {max_steps: 1}\n# "
    fits = write(tmp_path / "fits.yaml", head + "x" * (MAX_BYTES - len(head) - 1) + "\n")
    assert fits.stat().st_size == MAX_BYTES and load_profile(fits).training.max_steps == 1
    over = write(tmp_path / "over.yaml", head + "x" * (MAX_BYTES - len(head)) + "\n")
    assert f"{over}: larger than 1 MiB, the limit of a profile" in error_of(over)


@pytest.mark.parametrize("levels", [101, 5000])
def test_nesting_limit(tmp_path: Path, levels: int) -> None:
    path = write(tmp_path / "deep.yaml", "training: " + "[" * levels + "]" * levels + "\n")
    message = error_of(path)
    assert message.startswith(str(path)) and "nested more than 100 levels deep" in message


@pytest.mark.parametrize(
    "override, problem",
    [
        (
            "training.optimizer="
            + "["
            + ", ".join(
                f"&a{i} [" + ", ".join([f"*a{i - 1}" if i else "1"] * 10) + "]" for i in range(9)
            )
            + "]",
            "more than 100,000 YAML nodes",
        ),
        ("callbacks=[{name: &a [*a]}]", "recursive alias"),
        ("callbacks=[{? [a]: 1}]", "a mapping key is a list"),
        ("training.optimizer={kind: adamw, kind: adam}", "duplicate key 'kind'"),
        ("schedules=" + "[" * 200 + "]" * 200, "nested more than 100 levels deep"),
    ],
    ids=["bomb", "recursive", "complex_key", "duplicate", "deep"],
)
def test_override_values_are_read_under_the_same_limits(
    in_tmp: Path, override: str, problem: str
) -> None:
    key = override.partition("=")[0]
    message = error_of("quickstart", [override])
    assert message.startswith(f"--set {key}:1: ") and problem in message


def test_override_that_is_not_yaml_stays_text_for_the_schema(in_tmp: Path) -> None:
    message = error_of("quickstart", ["training.optimizer=[unclosed"])
    assert "training.optimizer: Input should be a valid dictionary" in message


# --- 4. values that would fail once training starts ---------------------------------------


def _problem(tmp_path: Path, yaml_text: str) -> str:
    path = write(tmp_path / "p.yaml", "extends: quickstart\n" + yaml_text)
    return error_of(path)


@pytest.mark.parametrize(
    "optimizer, key, expected",
    [
        ("{betas: [0.9, 1.0]}", "betas", "each beta must be in [0, 1)"),
        ("{betas: [1.5, 0.9]}", "betas", "each beta must be in [0, 1)"),
        ("{betas: [-0.1, 0.9]}", "betas", "each beta must be in [0, 1)"),
        ("{kind: adam, betas: [0.9, .nan]}", "betas.1", "finite number"),
        ("{eps: 0}", "eps", "greater than 0"),
        ("{weight_decay: -0.1}", "weight_decay", "greater than or equal to 0"),
        ("{kind: sgd, momentum: 0, nesterov: true}", "", "nesterov: true needs momentum > 0"),
        ("{kind: sgd, weight_decay: -1}", "weight_decay", "greater than or equal to 0"),
    ],
)
def test_optimizer_options(tmp_path: Path, optimizer: str, key: str, expected: str) -> None:
    message = _problem(tmp_path, f"training:\n  optimizer: {optimizer}\n")
    dotted = "training.optimizer" + (f".{key}" if key else "")
    assert (
        f"{dotted}: " in message and expected in message and f"{tmp_path / 'p.yaml'}:3" in message
    )


def test_good_optimizer_options_load(in_tmp: Path) -> None:
    cfg = load_profile("quickstart", ["training.optimizer.betas=[0.0, 0.999]"])
    assert cfg.training.optimizer.betas == (0.0, 0.999)
    sgd = load_profile("quickstart", ["training.optimizer={kind: sgd, nesterov: true}"])
    assert sgd.training.optimizer.kind == "sgd"


@pytest.mark.parametrize(
    "device", ["banana", "gpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "cpu0", "meta", "xpu"]
)
def test_device_form_is_checked_by_the_schema(in_tmp: Path, device: str) -> None:
    message = error_of("quickstart", [f"training.device={device}"])
    assert (
        "training.device: not a device APT can train on; use one of auto, cpu, cuda, cuda:N, mps"
        in message
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_forms_accepted(device: str) -> None:
    assert is_device_form(device)


@pytest.mark.parametrize(
    "device, cuda, mps, expected",
    [
        ("cuda:3", 0, False, "'cuda:3', but this machine has no CUDA device"),
        ("cuda:3", 2, False, "has 2 CUDA device(s); cuda:0 .. cuda:1 exist"),
        ("cuda", 0, True, "'cuda', but this machine has no CUDA device"),
        ("mps", 4, False, "no MPS (Apple GPU) device"),
    ],
)
def test_a_device_the_machine_lacks(device: str, cuda: int, mps: bool, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_device_present(device, cuda_devices=cuda, mps_available=mps, where="p.yaml:4")
    message = str(info.value)
    assert message.startswith("training.device: ") and expected in message
    assert "use device: auto" in message and message.endswith("[p.yaml:4]")


@pytest.mark.parametrize(
    "device, cuda, mps",
    [
        ("cuda:1", 2, False),
        ("cuda", 1, False),
        ("mps", 0, True),
        ("cpu", 0, False),
        ("auto", 0, False),
    ],
)
def test_a_device_the_machine_has(device: str, cuda: int, mps: bool) -> None:
    check_device_present(device, cuda_devices=cuda, mps_available=mps)


@pytest.mark.parametrize("vocab", [2, 100, 255])
def test_vocab_below_the_byte_tokenizer(tmp_path: Path, vocab: int) -> None:
    message = _problem(tmp_path, f"model:\n  vocab_size: {vocab}\n")
    assert f"model.vocab_size: {vocab} is smaller than the vocabulary of data.tokenizer" in message
    assert "'byte' (256 ids)" in message
    assert "at least 256" in message and f"{tmp_path / 'p.yaml'}:3" in message


def test_vocab_check_knows_the_byte_tokenizer_and_skips_others(in_tmp: Path) -> None:
    from apt.trainops.data.tokenizers import ByteTokenizer

    assert {"byte": ByteTokenizer.vocab_size} == TOKENIZER_VOCAB
    assert load_profile("quickstart", ["model.vocab_size=256"]).model.vocab_size == 256
    other = load_profile("quickstart", ["model.vocab_size=100", "data.tokenizer=my_bpe"])
    assert other.model.vocab_size == 100  # size unknown until built: checked by the builder
    assert vocab_mismatch(300, "my_bpe", 300) is None
    message = vocab_mismatch(100, "my_bpe", 32000) or ""
    assert (
        message.startswith("model.vocab_size: 100")
        and "data.tokenizer 'my_bpe' (32000 ids)" in message
    )


@pytest.mark.parametrize(
    "sets",
    [
        ["data.seq_len=129"],
        ["data.seq_len=4096"],
        ["model.max_seq_len=64"],
    ],
)
def test_seq_len_above_the_models_context(in_tmp: Path, sets: list[str]) -> None:
    message = error_of("quickstart", sets)
    assert "data.seq_len: " in message and "is longer than model.max_seq_len" in message
    assert "lower data.seq_len or raise model.max_seq_len" in message


def test_seq_len_against_a_presets_context(tmp_path: Path) -> None:
    text = "model: {preset: tiny}\ndata: {seq_len: 257}\ntraining: {max_steps: 1}\n"
    message = error_of(write(tmp_path / "preset.yaml", text))
    assert "data.seq_len: 257 is longer than model.max_seq_len (256)" in message
    assert f"[{tmp_path / 'preset.yaml'}:2]" in message
    fits = write(tmp_path / "fits.yaml", text.replace("257", "256"))
    assert load_profile(fits).data.seq_len == 256


@pytest.mark.parametrize(
    "seed, expected",
    [
        ("-1", "greater than or equal to 0"),
        (str(2**63), "less than or equal to 9223372036854775807"),
        (str(2**70), "less than or equal"),
    ],
)
def test_seed_range(in_tmp: Path, seed: str, expected: str) -> None:
    assert expected in error_of("quickstart", [f"training.seed={seed}"])


def test_seed_bounds_accepted(in_tmp: Path) -> None:
    for seed in (0, 2**63 - 1):
        assert load_profile("quickstart", [f"training.seed={seed}"]).training.seed == seed


@pytest.mark.parametrize(
    "section, value",
    [
        ("training:\n  learning_rate: .inf\n", "inf"),
        ("training:\n  lr: .nan\n", "nan"),
        ("training:\n  learning_rate: -.inf\n", "-inf"),
        ("training:\n  max_grad_norm: .inf\n", "inf"),
        ("model:\n  rope_theta: .inf\n", "inf"),
        ("model:\n  dropout: .nan\n", "nan"),
        ("data:\n  val_fraction: .nan\n", "nan"),
        ("schedules:\n  route_temp: {start: 1.0, end: .inf}\n", "inf"),
    ],
)
def test_non_finite_numbers_are_refused_everywhere(
    tmp_path: Path, section: str, value: str
) -> None:
    message = _problem(
        tmp_path,
        section.replace("model:\n", "model:\n  moe: {}\n") if "route_temp" in section else section,
    )
    assert "Input should be a finite number" in message and f"(got {value})" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999", "-1", "0"])
def test_learning_rate_override(in_tmp: Path, value: str) -> None:
    message = error_of("quickstart", [f"training.lr={value}"])
    assert "training.learning_rate: " in message and f"[--set training.lr={value}]" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("training.cpu_threads=5000", "less than or equal to 4096"),
        ("training.distributed.timeout_seconds=100000000000000", "less than or equal to 604800"),
        ("training.batch_size=0", "greater than or equal to 1"),
        ("training.max_grad_norm=0", "greater than 0"),
        ("data.seq_len=1", "greater than or equal to 2"),
    ],
)
def test_other_ranges(in_tmp: Path, override: str, expected: str) -> None:
    assert expected in error_of("quickstart", [override])


@pytest.mark.parametrize(
    "section, key",
    [
        ('artifacts:\n  output_dir: "runs\\0x"\n', "artifacts.output_dir"),
        ('data:\n  source: files\n  train_files: ["a.txt", "b\\0.txt"]\n', "data.train_files"),
        ('data:\n  cache_dir: "c\\0"\n', "data.cache_dir"),
    ],
)
def test_nul_in_text_is_refused(tmp_path: Path, section: str, key: str) -> None:
    message = _problem(tmp_path, section)
    assert f"{key}: holds a NUL character" in message


# --- 5. names that become path components -------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("''", "must be a folder name, not ''"),
        ("'.'", "must be a folder name, not '.'"),
        ("'..'", "must be a folder name, not '..'"),
        ("../escape", "must be one folder name, without / or \\"),
        ("/etc", "without / or \\"),
        ("a/b", "without / or \\"),
        ("'a\\b'", "without / or \\"),
        ('"x\\0y"', "NUL"),
        ('"x\\ny"', "control characters"),
    ],
)
def test_experiment_name_is_one_path_component(tmp_path: Path, name: str, expected: str) -> None:
    message = _problem(tmp_path, f"artifacts:\n  experiment_name: {name}\n")
    assert "artifacts.experiment_name: " in message and expected in message
    assert f"{tmp_path / 'p.yaml'}:3" in message


@pytest.mark.parametrize("name", ["run-1", "my.run", "ünï_cøde", "a b", "..hidden", "x..y"])
def test_experiment_names_that_are_fine(in_tmp: Path, name: str) -> None:
    cfg = load_profile("quickstart", [f"artifacts.experiment_name={name}"])
    assert cfg.artifacts.experiment_name == name
