"""The Trainer end to end on small real models: accumulation, batch formats, keywords."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_lm import BigramLM, PatternText
from torch import nn
from torch.utils.data import DataLoader

from apt.core.errors import ConfigError, DataError
from apt.trainops.engine import Callback, Control, Finetuner, RunState, Trainer


def train(tmp_path: Path, name: str, **kwargs: object) -> tuple[Trainer, object]:
    torch.manual_seed(0)
    trainer = Trainer(
        model=BigramLM(),
        train_dataset=PatternText(),
        eval_dataset=PatternText(n=16, seed=1),
        learning_rate=0.05,
        output_dir=str(tmp_path),
        experiment_name=name,
        **kwargs,  # type: ignore[arg-type]
    )
    return trainer, trainer.train()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in trainer.strategy.unwrap(trainer.model).state_dict().items()
    }


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b(tmp_path: Path) -> None:
    # Padding makes micro-batches hold different numbers of targets: a naive mean of means
    # would weight them wrongly; the engine weights each by its share of the step's targets.
    big, _ = train(tmp_path, "big", batch_size=8, gradient_accumulation_steps=1, max_steps=6)
    small, _ = train(tmp_path, "small", batch_size=4, gradient_accumulation_steps=2, max_steps=6)
    wa, wb = weights(big), weights(small)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    assert big.state.tokens_seen == small.state.tokens_seen


def test_loss_falls_and_result_fields(tmp_path: Path) -> None:
    _, result = train(tmp_path, "run", batch_size=8, num_epochs=3)
    assert result.global_step == 3 * (64 // 8)  # type: ignore[attr-defined]
    m = result.metrics  # type: ignore[attr-defined]
    assert m["val_loss_final"] < 0.7 * m["val_loss_initial"]
    assert {"train_loss", "val_loss_initial", "val_loss_final"} <= set(m)
    assert result.run_dir == tmp_path / "run"  # type: ignore[attr-defined]
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


def test_tuple_batches_and_explicit_loaders(tmp_path: Path) -> None:
    data = PatternText()
    pairs = [(data.ids[i], torch.roll(data.ids[i], -1)) for i in range(len(data))]
    loader = DataLoader(pairs, batch_size=8, shuffle=False)
    torch.manual_seed(0)
    trainer = Trainer(
        model=BigramLM(),
        train_dataloader=loader,
        max_steps=5,
        learning_rate=0.05,
        output_dir=str(tmp_path),
    )
    result = trainer.train()
    assert result.global_step == 5 and result.metrics["train_loss"] < 3.5


def test_a_model_and_a_dataset_alone_train_one_epoch(in_tmp: Path) -> None:
    """No config and no other keyword: every section has its default (one epoch)."""
    torch.manual_seed(0)
    trainer = Trainer(model=BigramLM(), train_dataset=PatternText(n=32))
    result = trainer.train()
    assert trainer.config.training.num_epochs == 1 and trainer.config.training.max_steps is None
    assert result.global_step == 32 // trainer.config.training.batch_size
    assert result.run_dir == Path("runs") / "default"
    trainer.close()


def test_unknown_keyword_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown keyword.*lerning_rate"):
        Trainer(model=BigramLM(), lerning_rate=0.1)
    with pytest.raises(ConfigError, match=r"max_step \(did you mean 'max_steps'\?\)"):
        Trainer(model=BigramLM(), max_step=5)


def test_too_little_data_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fewer than one optimizer step"):
        Trainer(
            model=BigramLM(),
            train_dataset=PatternText(n=4),
            batch_size=8,
            max_steps=3,
            output_dir=str(tmp_path),
        )


def test_batches_without_input_ids_are_rejected(tmp_path: Path) -> None:
    loader = DataLoader([{"tokens": torch.zeros(4, dtype=torch.long)}] * 8, batch_size=4)
    trainer = Trainer(
        model=BigramLM(), train_dataloader=loader, max_steps=1, output_dir=str(tmp_path)
    )
    with pytest.raises(DataError, match="must hold 'input_ids'"):
        trainer.train()


def test_finetuner_fine_tunes_a_pretrained_model_and_saves_it(tmp_path: Path) -> None:
    from apt.model import APTLargeModel

    torch.manual_seed(0)
    APTLargeModel(preset="tiny", vocab_size=32, num_layers=1, max_seq_len=16).save_pretrained(
        tmp_path / "base"
    )
    finetuner = Finetuner(
        model=APTLargeModel.from_pretrained(tmp_path / "base"),
        train_dataset=PatternText(n=32),
        eval_dataset=PatternText(n=8, seed=1),
        learning_rate=1e-3,
        num_epochs=2,
        batch_size=8,
        output_dir=str(tmp_path / "runs"),
    )
    assert (
        finetuner.config.training.num_epochs == 2
        and finetuner.config.training.learning_rate == 1e-3
    )
    result = finetuner.finetune()
    assert result.global_step == 2 * 32 // 8
    assert result.metrics["val_loss_final"] < result.metrics["val_loss_initial"]
    saved = APTLargeModel.from_pretrained(finetuner.save_model(tmp_path / "tuned"))
    assert isinstance(saved, APTLargeModel)
    trained = finetuner.strategy.unwrap(finetuner.model).state_dict()
    for key, value in saved.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_finetuner_defaults() -> None:
    finetuner = Finetuner(model=BigramLM(), train_dataset=PatternText(n=16), batch_size=8)
    t = finetuner.config.training
    assert (t.learning_rate, t.num_epochs) == (1e-5, 3)


class CommitWatcher(Callback):
    """Records, at each checkpoint_save, the step and whether its checkpoint is committed."""

    def __init__(self, save_dir: Path) -> None:
        self.save_dir = save_dir
        self.seen: list[tuple[str, int, bool]] = []

    def on_checkpoint_save(self, state: RunState, control: Control) -> None:
        latest = (self.save_dir / "LATEST").read_text().strip()
        committed = (self.save_dir / latest / "MANIFEST.json").is_file()
        self.seen.append(("checkpoint_save", int(latest.removeprefix("step-")), committed))

    def on_train_end(self, state: RunState, control: Control) -> None:
        self.seen.append(("train_end", state.global_step, True))


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_save_fires_once_per_commit_after_it(tmp_path: Path, async_save: bool) -> None:
    from apt import load_profile

    cfg = load_profile(
        "cpu/tiny",
        overrides=[
            "training.max_steps=12",
            "training.checkpoints.save_interval=4",
            f"training.checkpoints.async_save={str(async_save).lower()}",
            f"artifacts.output_dir={tmp_path}",
            "data.max_corpus_bytes=20000",
        ],
    )
    watcher = CommitWatcher(tmp_path / "tiny" / "checkpoints")
    Trainer.from_config(cfg, callbacks=[watcher]).train()
    saves = [s for s in watcher.seen if s[0] == "checkpoint_save"]
    assert [step for _, step, _ in saves] == [4, 8, 12]  # each save once, in order
    assert all(committed for _, _, committed in saves)
    assert watcher.seen[-1][0] == "train_end"  # the final save is announced before train_end


class GrowHead(Callback):
    """Stands in for a recipe that trains a value head beside the model: changes it each step."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def on_step_end(self, state: RunState, control: Control) -> None:
        with torch.no_grad():
            self.head.weight.add_(1.0)


def test_an_extra_part_of_the_bundle_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    def trainer(max_steps: int, head: nn.Module) -> Trainer:
        torch.manual_seed(0)
        built = Trainer(
            model=BigramLM(),
            train_dataset=PatternText(),
            max_steps=max_steps,
            save_interval=2,
            output_dir=str(tmp_path),
            experiment_name="extras",
            callbacks=[GrowHead(head)],
        )
        built.bundle.add("value_head", head)  # one entry: saved, verified and loaded with the rest
        return built

    head = nn.Linear(4, 1, bias=False)
    first = trainer(4, head)
    first.train()
    at_step_4 = head.weight.detach().clone()
    assert (
        tmp_path / "extras/checkpoints/step-000000004/parts/value_head/model.safetensors"
    ).is_file()
    fresh = nn.Linear(4, 1, bias=False)
    second = trainer(6, fresh)  # extends the finished run: resumes at step 4
    second.train()
    assert second.state.global_step == 6
    torch.testing.assert_close(fresh.weight, at_step_4 + 2.0, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() > 3, reason="this machine has a cuda:3")
def test_a_device_the_machine_lacks_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training.device: 'cuda:3', but this machine has"):
        Trainer(
            model=BigramLM(), train_dataset=PatternText(), device="cuda:3", output_dir=str(tmp_path)
        )


def test_the_monitoring_keyword_turns_loggers_on(tmp_path: Path) -> None:
    """Seed 002's ``Trainer(model=..., monitoring={'tensorboard': True})``."""
    from monitoring_stores import tensorboard_scalars

    torch.manual_seed(0)
    trainer = Trainer(
        model=BigramLM(),
        train_dataset=PatternText(),
        max_steps=4,
        output_dir=str(tmp_path),
        experiment_name="watched",
        monitoring={"tensorboard": True, "log_interval": 2},
    )
    assert [entry.kind for entry in trainer.config.monitoring.loggers] == ["tensorboard"]
    trainer.train()
    points = tensorboard_scalars(tmp_path / "watched" / "tensorboard", "train_loss")
    assert [step for step, _ in points] == [2, 4]
