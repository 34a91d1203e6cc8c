"""The local model store: names, atomic writes, model cards, and from_pretrained by name."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from apt.core.errors import CheckpointError, ModelStoreError
from apt.core.version import __version__
from apt.model import APTLargeModel, APTModel, ModelStore
from apt.model.store import (
    CARD_JSON,
    CARD_MARKDOWN,
    TrainingSummary,
    check_model_name,
    default_store_root,
)

Factory = Callable[..., APTModel]
IDS = torch.tensor([[1, 5, 9, 200, 3, 7]])


def _logits(model: APTModel) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _hidden(root: Path) -> list[str]:
    """Staging and discarded folders left behind (there must be none)."""
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_default_root_is_apt_home_else_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APT_HOME", str(tmp_path / "store"))
    assert default_store_root() == tmp_path / "store"
    assert ModelStore().root == tmp_path / "store"
    assert ModelStore(tmp_path / "other").root == tmp_path / "other"  # explicit wins
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("APT_HOME", "")
    assert default_store_root() == tmp_path / "home" / ".cache" / "apt" / "models"
    monkeypatch.delenv("APT_HOME")
    assert default_store_root() == tmp_path / "home" / ".cache" / "apt" / "models"


@pytest.mark.parametrize(
    "name", ["", ".", "..", ".hidden", "-x", "_x", "a/b", "a\\b", "/abs", "a b", "é", "x" * 101]
)
def test_names_that_could_be_paths_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelStoreError, match="is not a model name") as err:
        ModelStore(tmp_path).path(name)
    assert err.value.exit_code == 2
    assert not tmp_path.joinpath("a").exists()


@pytest.mark.parametrize("name", ["a", "apt-base", "tiny_code.v2", "A1", "x" * 100])
def test_valid_names(name: str) -> None:
    assert check_model_name(name) == name


def test_save_writes_the_model_and_its_card(tiny_model: Factory, tmp_path: Path) -> None:
    store, model = ModelStore(tmp_path / "store"), tiny_model()
    summary = TrainingSummary(
        run="/runs/tiny", data="python_stdlib", steps=7, final_metrics={"val_loss": 1.5}
    )
    path = store.save("tiny", model, source="/runs/tiny/final_model", training=summary)
    assert path == tmp_path / "store" / "tiny"
    assert sorted(p.name for p in path.iterdir()) == [
        CARD_MARKDOWN,
        "config.json",
        "model.safetensors",
        CARD_JSON,
    ]
    card = json.loads((path / CARD_JSON).read_text())
    assert card["name"] == "tiny" and card["format"] == 1
    assert card["parameters"] == model.num_parameters()
    assert (card["steps"], card["data"], card["run"]) == (7, "python_stdlib", "/runs/tiny")
    assert card["final_metrics"] == {"val_loss": 1.5}
    assert card["config"] == model.config.model_dump(mode="json")
    assert card["apt_version"] == __version__ and card["tokenizer"] is None
    assert card["source"] == "/runs/tiny/final_model" and card["checkpoint"] is None
    text = (path / CARD_MARKDOWN).read_text()
    assert text.startswith("# tiny\n")
    assert "| steps | 7 |" in text and "| val_loss | 1.5000 |" in text
    assert 'APTModel.from_pretrained("tiny")' in text

    info = store.info("tiny")
    assert info.card == card and info.final_loss == 1.5
    assert info.size_bytes == sum(p.stat().st_size for p in path.iterdir())
    assert store.names() == ["tiny"] and "tiny" in store
    assert _hidden(store.root) == []


def test_a_taken_name_needs_overwrite(tiny_model: Factory, tmp_path: Path) -> None:
    store, first, second = ModelStore(tmp_path), tiny_model(seed=1), tiny_model(seed=2)
    store.save("m", first)
    with pytest.raises(ModelStoreError, match=r"holds 'm' already.*overwrite=True \(--force"):
        store.save("m", second)
    assert torch.equal(_logits(APTLargeModel.from_pretrained("m", store=store)), _logits(first))
    store.save("m", second, overwrite=True)
    assert torch.equal(_logits(APTLargeModel.from_pretrained("m", store=store)), _logits(second))
    assert store.names() == ["m"] and _hidden(tmp_path) == []


def test_a_failed_write_leaves_the_old_model(
    tiny_model: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, old, new = ModelStore(tmp_path), tiny_model(seed=1), tiny_model(seed=2)
    store.save("m", old)

    def disk_full(folder: Path, state_dict: object = None) -> Path:
        (Path(folder) / "config.json").write_text("{}")  # half-written
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(new, "save_pretrained", disk_full)
    with pytest.raises(ModelStoreError, match=r"could not save 'm'.*No space left on device"):
        store.save("m", new, overwrite=True)
    assert torch.equal(_logits(APTLargeModel.from_pretrained("m", store=store)), _logits(old))
    assert _hidden(tmp_path) == []


def test_only_apt_models_are_stored(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="cannot store a Linear"):
        ModelStore(tmp_path).save("lin", nn.Linear(2, 2))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_missing_name_lists_the_store(tiny_model: Factory, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelStoreError, match=r"store .* \(it is empty\)"):
        APTLargeModel.from_pretrained("apt-base", store=store)
    for name in ("b", "a"):
        store.save(name, tiny_model())
    (store.root / ".c.tmp-1").mkdir()  # a staging folder, not a model
    (store.root / "notes").mkdir()  # no config.json: not a model either
    assert store.names() == ["a", "b"]
    with pytest.raises(CheckpointError) as err:  # what callers of from_pretrained catch
        APTLargeModel.from_pretrained("apt-base", store=store)
    message = str(err.value)
    assert isinstance(err.value, ModelStoreError) and err.value.exit_code == 2
    assert "no model named 'apt-base'" in message and "(it holds: a, b)" in message
    assert "python -m apt export RUN_DIR --name apt-base" in message
    assert "APT_HOME" in message
    with pytest.raises(ModelStoreError, match="no model named 'c'"):
        store.info("c")


def test_a_folder_wins_over_a_name(
    tiny_model: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, here, stored = ModelStore(tmp_path / "store"), tiny_model(seed=1), tiny_model(seed=2)
    store.save("m", stored)
    here.save_pretrained(tmp_path / "work" / "m")
    monkeypatch.chdir(tmp_path / "work")
    assert store.resolve("m") == Path("m")
    assert torch.equal(_logits(APTLargeModel.from_pretrained("m", store=store)), _logits(here))
    monkeypatch.chdir(tmp_path)
    assert store.resolve("m") == store.root / "m"
    with pytest.raises(CheckpointError, match="save_pretrained") as err:
        store.resolve(tmp_path / "work" / "nope")  # a path, not a name
    assert not isinstance(err.value, ModelStoreError)


def test_from_pretrained_by_name_through_apt_home(
    tiny_model: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = tiny_model()
    ModelStore().save("tiny", model)
    assert (tmp_path / "home" / "tiny" / "config.json").is_file()
    large = APTLargeModel.from_pretrained("tiny")
    plain = APTModel.from_pretrained("tiny")
    assert type(large) is APTLargeModel and type(plain) is APTModel
    assert torch.equal(_logits(large), _logits(model))
    assert torch.equal(_logits(plain), _logits(model))


def test_remove(tiny_model: Factory, tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.save("a", tiny_model())
    store.save("b", tiny_model())
    assert store.remove("a") == tmp_path / "a"
    assert store.names() == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    with pytest.raises(ModelStoreError, match=r"no model named 'a'.*\(it holds: b\)"):
        store.remove("a")
    with pytest.raises(ModelStoreError, match="is not a model name"):
        store.remove("../b")
    assert store.names() == ["b"]
