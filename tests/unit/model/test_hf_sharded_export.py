"""to_hf past ``max_shard_size``: shards and an index that transformers and from_hf read, the
same logits as one file, stale weights files removed on re-export, bad sizes refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apt.core.config import ModelConfig
from apt.model import APTModel
from apt.model.interop import InteropError, from_hf, to_hf
from apt.model.interop.shards import INDEX_FILE, WEIGHTS_FILE, parse_size, plan_shards

transformers = pytest.importorskip("transformers")

ATOL = 1e-5  # fp32 rounding between the two implementations (as in test_hf_interop)


def _model() -> APTModel:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64
    )
    return APTModel(config).eval()


def _weights(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if "safetensors" in p.name}


def test_sharded_export_loads_in_transformers_with_the_logits_of_one_file(
    tmp_path: Path,
) -> None:
    model = _model()  # ~ 0.3 MB of fp32 weights: 60KB shards give several files
    to_hf(model, tmp_path / "one")
    to_hf(model, tmp_path / "sharded", max_shard_size="60KB")
    files = _weights(tmp_path / "sharded")
    assert WEIGHTS_FILE not in files and INDEX_FILE in files
    shards = sorted(files - {INDEX_FILE})
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    for shard in shards:
        size = (tmp_path / "sharded" / shard).stat().st_size
        alone = list(index["weight_map"].values()).count(shard) == 1  # the 64 KiB embedding
        assert alone or size < 60_000 + 4096  # the tensors fit the size; a little header besides
    assert set(index["weight_map"].values()) == set(shards)
    total = sum(p.numel() * 4 for p in model.parameters())
    assert index["metadata"]["total_size"] == total

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    load = transformers.AutoModelForCausalLM.from_pretrained
    theirs = load(tmp_path / "sharded", attn_implementation="eager").eval()
    whole = load(tmp_path / "one", attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model(ids).logits
        assert float((theirs(ids).logits - ours).abs().max()) < ATOL
        assert torch.equal(theirs(ids).logits, whole(ids).logits)
    back = from_hf(tmp_path / "sharded")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_re_export_removes_the_weights_files_it_no_longer_writes(tmp_path: Path) -> None:
    model = _model()
    to_hf(model, tmp_path / "out", max_shard_size="60KB")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    to_hf(model, tmp_path / "out")
    assert _weights(tmp_path / "out") == {WEIGHTS_FILE}  # no stale shard read with the new file
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # not ours: kept
    to_hf(model, tmp_path / "out", max_shard_size="100KB")
    assert WEIGHTS_FILE not in _weights(tmp_path / "out")
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize(
    ("size", "expected"),
    [(4096, 4096), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29), ("7", 7)],
)
def test_parse_size(size: int | str, expected: int) -> None:
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["big", "5 parsecs", "0", "0.1B", -3])
def test_parse_size_refuses_what_is_not_a_size(size: int | str) -> None:
    with pytest.raises(InteropError, match="max shard size"):
        parse_size(size)


def test_a_tensor_over_the_size_gets_a_shard_of_its_own() -> None:
    files = plan_shards({"a": 10, "big": 100, "b": 10, "c": 10}, 25)
    assert list(files.values()) == [["a"], ["big"], ["b", "c"]]
    assert plan_shards({"a": 10, "b": 10}, 25) == {WEIGHTS_FILE: ["a", "b"]}


def test_cli_refuses_a_shard_size_without_the_hf_format(tmp_path: Path) -> None:
    from apt.cli.main import main

    folder = _model().save_pretrained(tmp_path / "model")
    code = main(["export", str(folder), "--name", "tiny", "--max-shard-size", "1GB"])
    assert code == 2  # the store holds APT models, in one file
    code = main(["export", str(folder), "--format", "hf", "--output", str(tmp_path / "x"),
                 "--max-shard-size", "lots"])  # fmt: skip
    assert code == 2 and not (tmp_path / "x").exists()
