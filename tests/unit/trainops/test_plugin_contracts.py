"""Every registered plugin passes the same checks: it is selectable by ``kind`` from YAML, it
builds from its default config, its state round-trips, and a bad option fails naming the key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apt.core.config import (
    CallbackSpec,
    OptimizerConfig,
    SchedulerConfig,
    SchedulesConfig,
    TaskSpec,
    TokenizerSpec,
    config_from_dict,
)
from apt.core.config.schema_walk import unwrap
from apt.core.errors import ConfigError
from apt.trainops.data import TOKENIZERS, build_tokenizer
from apt.trainops.engine import CALLBACKS, TASKS
from apt.trainops.engine.callbacks import build_callback
from apt.trainops.engine.lr_schedules import LR_SCHEDULES, build_lr_scheduler
from apt.trainops.engine.optim import OPTIMIZERS, build_optimizer
from apt.trainops.engine.tasks import build_task


def _configs(union: object, tag: str) -> dict[str, type]:
    """Config classes of a discriminated union by their ``kind``/``type`` default."""
    return {m.model_fields[tag].default: m for m in unwrap(union)}


OPTIMIZER_CONFIGS = _configs(OptimizerConfig, "kind")
SCHEDULE_CONFIGS = _configs(SchedulerConfig, "type")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    out = model(torch.tensor([[1, 2, 3]]))
    out.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _bad_option(section: str, tag: str, kind: str) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"training": {"max_steps": 1, section: {tag: kind, "bogus_option": 1}}})
    return str(err.value)


def test_every_config_kind_has_a_registered_implementation_and_back() -> None:
    assert sorted(OPTIMIZER_CONFIGS) == OPTIMIZERS.names()
    assert sorted(SCHEDULE_CONFIGS) == LR_SCHEDULES.names()


@pytest.mark.parametrize("kind", OPTIMIZERS.names())
def test_optimizer_contract(kind: str) -> None:
    cfg = OPTIMIZER_CONFIGS[kind]()
    model = _model()
    optimizer = build_optimizer(cfg, model=model, learning_rate=0.1)
    _step(model, optimizer)
    again = build_optimizer(cfg, model=model, learning_rate=0.5)
    again.load_state_dict(optimizer.state_dict())
    assert again.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(again.state_dict()["state"][key][name]), torch.as_tensor(value)
            )
    assert "training.optimizer.bogus_option: unknown key" in _bad_option("optimizer", "kind", kind)


@pytest.mark.parametrize("kind", LR_SCHEDULES.names())
def test_lr_schedule_contract(kind: str) -> None:
    cfg = SCHEDULE_CONFIGS[kind](warmup_steps=2)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = build_lr_scheduler(cfg, optimizer=optimizer, total_steps=20)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    other_opt = torch.optim.SGD(_model().parameters(), lr=0.1)
    other = build_lr_scheduler(cfg, optimizer=other_opt, total_steps=20)
    other.load_state_dict(schedule.state_dict())
    for _ in range(3):
        for opt, sched in ((optimizer, schedule), (other_opt, other)):
            opt.step()
            sched.step()
        assert other.get_last_lr() == schedule.get_last_lr()
    assert "training.scheduler.bogus_option: unknown key" in _bad_option("scheduler", "type", kind)


@pytest.mark.parametrize("kind", TASKS.names())
def test_task_contract(kind: str) -> None:
    task = build_task(TaskSpec(kind=kind))
    assert isinstance(task, TASKS.get(kind))
    assert task.options == type(task).Options()  # the defaults
    dumped = TaskSpec(kind=kind, **task.options.model_dump())
    assert build_task(TaskSpec.model_validate(dumped.model_dump())).options == task.options
    with pytest.raises(ConfigError, match=r"training\.task\.bogus_option: unknown option"):
        build_task(TaskSpec(kind=kind, bogus_option=1))


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small byte-level BPE tokenizer.json, for the tokenizers that read one."""
    from apt.trainops.data import python_stdlib_files
    from apt.trainops.data.bpe import train_bpe

    folder = tmp_path_factory.mktemp("bpe")
    for i, path in enumerate(python_stdlib_files()[:10]):
        (folder / f"{i}.txt").write_text(path.read_text(encoding="utf-8", errors="replace"))
    return str(train_bpe([str(folder / "*.txt")], vocab_size=400, output=folder / "tok"))


@pytest.mark.parametrize("kind", TOKENIZERS.names())
def test_tokenizer_contract(kind: str, tokenizer_file: str) -> None:
    options = {"path": tokenizer_file} if kind in ("bpe", "hf") else {}
    tokenizer = build_tokenizer(TokenizerSpec(kind=kind, **options))
    text = "def main():\n    return 'héllo'  # ünïcode\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < tokenizer.vocab_size
    with pytest.raises(ConfigError, match=r"data\.tokenizer\.bogus_option: unknown option"):
        build_tokenizer({"kind": kind, "bogus_option": 1, **options})


@pytest.mark.parametrize("name", CALLBACKS.names())
def test_callback_contract(name: str) -> None:
    runtime = {"sink": None, "schedules": SchedulesConfig()}
    callback = build_callback(CallbackSpec(name=name), **runtime)
    state = callback.state_dict()
    again = build_callback(CallbackSpec(name=name), **runtime)
    again.load_state_dict(state)
    assert again.state_dict() == state
    with pytest.raises(ConfigError, match=r"bogus_option"):
        build_callback(CallbackSpec(name=name, bogus_option=1), **runtime)


def test_the_union_members_of_a_plugin_section_are_classified_alike() -> None:
    # Resume classification picks a union's member by key; the kinds must agree on shared keys.
    for union in (OptimizerConfig, SchedulerConfig):
        members = list(unwrap(union))
        for field in set.intersection(*(set(m.model_fields) for m in members)):
            declared = {str(m.model_fields[field].json_schema_extra) for m in members}
            assert len(declared) == 1 and len({m.resume for m in members}) == 1, field
