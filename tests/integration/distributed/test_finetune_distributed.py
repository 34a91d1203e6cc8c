"""Partial fine-tuning under DDP and FSDP (2 gloo ranks, CPU), through the real CLI: LoRA
adapters and frozen parameters train as in one process, frozen tensors stay bit-identical,
and an FSDP LoRA run resumed from its checkpoint (DCP shards holding the adapters) ends where
the uninterrupted one does.

The runs are trainer_runs' BASE (cpu/tiny, 20 steps, global batch 8), so the tolerances are
those of test_trainer_distributed.py and for the same reason: only the order of sums differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trainer_runs as tr

pytestmark = pytest.mark.distributed

LOSS_RTOL = 1e-5  # as test_trainer_distributed.py (measured there: 2.1e-7)
WEIGHT_RTOL = 1e-4  # ditto (Adam's sign noise on round-off-sized gradients)
LORA = "finetune.lora={rank: 4, alpha: 8}"  # merged into final_model
FREEZE = "finetune.freeze=[embeddings, layers.0]"
FROZEN = ("embed_tokens.", "lm_head.", "blocks.0.")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune_dist")


@pytest.fixture(scope="module")
def runs(work: Path) -> dict[str, Path]:
    """One process and both strategies, for LoRA and for freezing."""
    cmds = {
        "lora-single": tr.single_cmd("lora-single", LORA),
        "lora-fsdp": tr.launch_cmd("lora-fsdp", "fsdp", LORA),
        "freeze-single": tr.single_cmd("freeze-single", FREEZE),
        "freeze-ddp": tr.launch_cmd("freeze-ddp", "ddp", FREEZE),
        "freeze-fsdp": tr.launch_cmd("freeze-fsdp", "fsdp", FREEZE),
    }
    for cmd in cmds.values():
        tr.run(cmd, work).check()
    return {name: work / "runs" / name for name in cmds}


def _start() -> dict[str, torch.Tensor]:
    """The weights every run starts from: the model the Trainer builds after seeding."""
    from apt import load_profile
    from apt.model import build_model
    from apt.trainops.engine.precision import seed_everything

    cfg = load_profile("cpu/tiny", overrides=list(tr.BASE))
    seed_everything(cfg.training.seed, deterministic=False)
    return {k: v.detach().clone() for k, v in build_model(cfg.model).state_dict().items()}


@pytest.mark.parametrize(
    ("kind", "strategy"), [("lora", "fsdp"), ("freeze", "ddp"), ("freeze", "fsdp")]
)
def test_partial_fine_tuning_trains_as_one_process(
    runs: dict[str, Path], kind: str, strategy: str
) -> None:
    ref, got = runs[f"{kind}-single"], runs[f"{kind}-{strategy}"]
    diffs = tr.loss_rel_diffs(tr.train_losses(got), tr.train_losses(ref))
    assert max(diffs.values()) < LOSS_RTOL, diffs
    assert tr.max_rel_diff(tr.final_weights(got), tr.final_weights(ref)) < WEIGHT_RTOL


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_frozen_tensors_end_bit_identical_and_the_rest_train(
    runs: dict[str, Path], strategy: str
) -> None:
    start, end = _start(), tr.final_weights(runs[f"freeze-{strategy}"])
    assert set(end) <= set(start) and "blocks.1.attn.q_proj.weight" in end  # tied head: once
    for name, value in end.items():
        assert torch.equal(value, start[name]) == name.startswith(FROZEN), name


def test_lora_under_fsdp_changes_only_the_adapted_projections(runs: dict[str, Path]) -> None:
    start, merged = _start(), tr.final_weights(runs["lora-fsdp"])
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, value in merged.items():
        assert torch.equal(value, start[name]) != any(f".{p}." in name for p in adapted), name


def test_an_fsdp_lora_run_resumed_from_its_checkpoint_ends_where_the_uninterrupted_one_does(
    runs: dict[str, Path], work: Path
) -> None:
    name = "lora-fsdp-resumed"
    tr.run(tr.launch_cmd(name, "fsdp", LORA, "training.max_steps=10"), work).check()
    files = tr.checkpoint_files(work / "runs" / name, 10)
    assert any(f.startswith("model/") and f.endswith(".distcp") for f in files), sorted(files)
    tr.run(tr.launch_cmd(name, "fsdp", LORA), work).check()
    resumed, whole = work / "runs" / name, runs["lora-fsdp"]
    assert tr.train_losses(resumed) == tr.train_losses(whole)  # exactly
    assert tr.bitwise_equal(tr.final_weights(resumed), tr.final_weights(whole))


def test_an_fsdp_lora_checkpoint_loads_in_one_process_as_the_merged_final_model(
    runs: dict[str, Path],
) -> None:
    from apt.trainops.engine import load_trained_model

    trained = load_trained_model(runs["lora-fsdp"] / "checkpoints")  # DCP shards of 2 ranks
    assert trained.step == 20 and len(trained.merged) == 14
    state = trained.model.state_dict()
    final = tr.final_weights(runs["lora-fsdp"])
    assert set(final) <= set(state)
    assert tr.bitwise_equal({k: state[k] for k in final}, final)
