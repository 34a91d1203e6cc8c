"""Retention keeps last_n, best_n and milestones, and never the newest or the only one."""

from __future__ import annotations

from pathlib import Path

from apt.trainops.checkpoints import CheckpointInfo, CheckpointManager, RetentionPolicy, select_kept


def _infos(steps, losses=None):
    return [
        CheckpointInfo(
            step=s,
            path=Path(f"step-{s}"),
            sequence=i + 1,
            metrics={} if losses is None else {"val_loss": losses[i]},
        )
        for i, s in enumerate(steps)
    ]


def _kept_steps(infos, policy):
    return sorted(int(p.name.split("-")[1]) for p in select_kept(infos, policy))


def test_last_n():
    infos = _infos([100, 200, 300, 400, 500])
    assert _kept_steps(infos, RetentionPolicy(keep_last_n=2)) == [400, 500]


def test_newest_kept_even_when_no_pool_wants_it():
    infos = _infos([1, 2, 3], [1.0, 2.0, 9.0])
    assert _kept_steps(infos, RetentionPolicy(keep_last_n=0, keep_best_n=1)) == [1, 3]


def test_only_one_is_kept():
    assert _kept_steps(_infos([100]), RetentionPolicy(keep_last_n=1, keep_best_n=0)) == [100]
    assert select_kept([], RetentionPolicy(keep_last_n=1)) == set()


def test_best_n_min_and_max_and_missing_or_nan_metric():
    losses = [3.0, 1.0, float("nan"), 2.0, 5.0, 4.0]
    infos = _infos([1, 2, 3, 4, 5, 6], losses)
    infos[3] = CheckpointInfo(step=4, path=Path("step-4"), sequence=4, metrics={})  # no metric
    policy = RetentionPolicy(keep_last_n=1, keep_best_n=2, best_mode="min")
    assert _kept_steps(infos, policy) == [1, 2, 6]  # best: 1.0 (2), 3.0 (1); newest 6
    policy = RetentionPolicy(keep_last_n=1, keep_best_n=2, best_mode="max")
    assert _kept_steps(infos, policy) == [5, 6]  # 5.0 (5), 4.0 (6, newest too)


def test_best_ties_keep_the_newer():
    infos = _infos([1, 2, 3], [1.0, 1.0, 9.0])
    policy = RetentionPolicy(keep_last_n=1, keep_best_n=1)
    assert _kept_steps(infos, policy) == [2, 3]


def test_milestones_kept_forever():
    infos = _infos(list(range(100, 1100, 100)))
    policy = RetentionPolicy(keep_last_n=2, milestone_interval=500)
    assert _kept_steps(infos, policy) == [500, 900, 1000]


def test_newest_commit_is_kept_even_when_a_higher_step_exists():
    infos = [
        CheckpointInfo(step=300, path=Path("step-300"), sequence=1),
        CheckpointInfo(step=200, path=Path("step-200"), sequence=2),  # re-saved after fallback
    ]
    assert _kept_steps(infos, RetentionPolicy(keep_last_n=1)) == [200]


def test_manager_applies_all_pools_on_disk(ckpt_dir, setup_factory):
    model = setup_factory(0).model
    manager = CheckpointManager(
        save_dir=ckpt_dir,
        keep_last_n=2,
        keep_best_n=1,
        best_metric="val_loss",
        milestone_interval=4,
    )
    losses = {1: 5.0, 2: 0.5, 3: 4.0, 4: 3.0, 5: 2.0, 6: 6.0, 7: 7.0}
    for step, loss in losses.items():
        manager.save(step, model=model, metrics={"val_loss": loss})
    on_disk = sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("step-*"))
    assert on_disk == [2, 4, 6, 7]  # best 2, milestone 4, last two 6 and 7
    assert [i.step for i in manager.list_checkpoints()] == [2, 4, 6, 7]
    assert (ckpt_dir / "LATEST").read_text().strip() == "step-000000007"
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tmp-")]
