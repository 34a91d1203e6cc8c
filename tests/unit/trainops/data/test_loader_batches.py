"""create_dataloader over a ShardDataset reads whole batches (``get_batch``): the batches are
bitwise those of the item-by-item path, and sampler, length, resume and workers are unchanged.

The reference batches are built without the loader: ``default_collate`` of ``dataset[i]`` over
the sampler's own order, cut into batches.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from shard_folder import ShardFolder, stdlib_texts, write_shard_folder
from torch.utils.data import default_collate

from apt.trainops.data import ResumableSampler, ShardDataset, create_dataloader

SEQ = 16
KEYS = ["document_ids", "input_ids", "labels"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ShardFolder:
    # Documents of 12 to 84 tokens, so most windows of 16 hold two; shards of 37 tokens, so
    # about every other window of 17 tokens spans two shards.
    documents = [f"document {i:02d} " * (1 + i % 7) for i in range(80)]
    texts = {"train": documents, "val": stdlib_texts(500)}
    return write_shard_folder(tmp_path_factory.mktemp("data") / "s", texts, shard_tokens=37)


def reference(
    dataset: ShardDataset, sampler: ResumableSampler, batch: int, drop_last: bool
) -> list[dict[str, torch.Tensor]]:
    order = sampler.epoch_indices()
    cut = len(order) - len(order) % batch if drop_last else len(order)
    return [
        default_collate([dataset[i] for i in order[at : at + batch]]) for at in range(0, cut, batch)
    ]


def assert_same(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]]) -> None:
    assert len(got) == len(want) > 0
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert sorted(a) == sorted(b), step
        for key in b:
            assert a[key].dtype == b[key].dtype == torch.int64, (step, key)
            assert a[key].shape == b[key].shape and a[key].is_contiguous(), (step, key)
            assert torch.equal(a[key], b[key]), (step, key)


@pytest.mark.parametrize("document_ids", [False, True])
@pytest.mark.parametrize(
    ("rank", "world", "drop_last"), [(0, 1, True), (1, 2, True), (3, 7, False)]
)
def test_batches_equal_the_item_by_item_path(
    folder: ShardFolder, document_ids: bool, rank: int, world: int, drop_last: bool
) -> None:
    dataset = ShardDataset(folder.path, "train", SEQ, document_ids=document_ids)
    batch = 6  # 240 windows: 35 per rank of 7 (padded), the last batch partial
    loader, per_item = (
        create_dataloader(
            dataset,
            batch_size=batch,
            num_workers=0,
            seed=3,
            rank=rank,
            world_size=world,
            drop_last=drop_last,
            collate_fn=collate,
        )
        for collate in (None, default_collate)
    )
    assert loader.collate_fn is not default_collate and per_item.collate_fn is default_collate
    spanning = 0
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        per_item.sampler.set_epoch(epoch)
        want = reference(dataset, loader.sampler, batch, drop_last)
        got = list(loader)
        assert_same(got, want)
        assert_same(list(per_item), want)
        assert sorted(got[0]) == (KEYS if document_ids else KEYS[1:])
        if document_ids:  # windows holding two documents
            assert any(len(row.unique()) > 1 for b in got for row in b["document_ids"])
        spanning += sum(
            (i * SEQ) // 37 != (i * SEQ + SEQ) // 37 for i in loader.sampler.epoch_indices()
        )
        if not drop_last:  # the last batch is a partial one
            assert len(got[-1]["input_ids"]) == len(loader.sampler) % batch > 0
    assert spanning > 0, "no batch held a window across two shards"


def test_sampler_length_and_drop_last_are_those_of_the_item_path(folder: ShardFolder) -> None:
    dataset = ShardDataset(folder.path, "train", SEQ)
    for drop_last in (True, False):
        loader = create_dataloader(dataset, batch_size=7, num_workers=0, drop_last=drop_last)
        per_item = create_dataloader(
            dataset, batch_size=7, num_workers=0, drop_last=drop_last, collate_fn=default_collate
        )
        assert isinstance(loader.sampler, ResumableSampler)
        assert len(loader.sampler) == len(per_item.sampler) == len(dataset)
        assert len(loader) == len(per_item) == len(list(loader))
        assert len(loader) == (len(dataset) // 7 if drop_last else -(-len(dataset) // 7))
        assert (loader.batch_size, loader.drop_last) == (7, drop_last)
        # The loader reads a stacked copy; the dataset given keeps torch's list of items.
        assert isinstance(loader.dataset, ShardDataset) and len(loader.dataset) == len(dataset)
        assert isinstance(loader.dataset.__getitems__([0, 1]), dict)
        assert isinstance(dataset.__getitems__([0, 1]), list)


def test_mid_epoch_resume_yields_the_batches_not_consumed(folder: ShardFolder) -> None:
    dataset = ShardDataset(folder.path, "train", SEQ, document_ids=True)
    batch, k = 4, 3
    loader = create_dataloader(dataset, batch_size=batch, num_workers=2, seed=9, world_size=2)
    loader.sampler.set_epoch(1)
    full = list(loader)
    it = iter(loader)
    for _ in range(k):
        next(it)  # the workers prefetch further; only consumed batches count
    del it
    loader.sampler.set_start(k * batch)
    state = loader.sampler.state_dict()
    assert state == {"epoch": 1, "start": k * batch}

    resumed = create_dataloader(dataset, batch_size=batch, num_workers=0, seed=9, world_size=2)
    resumed.sampler.load_state_dict(state)
    assert_same(list(resumed), full[k:])
    assert_same(list(resumed), full)  # the start applied to one iteration only


def test_workers_read_the_same_batches(folder: ShardFolder) -> None:
    dataset = ShardDataset(folder.path, "train", SEQ, document_ids=True)
    runs = []
    for workers in (0, 2):
        loader = create_dataloader(dataset, batch_size=6, num_workers=workers, seed=1)
        loader.sampler.set_epoch(2)
        runs.append(list(loader))
    assert_same(runs[1], runs[0])
    # What a spawned worker receives: the stacked copy, without open maps, still stacking.
    stacked = create_dataloader(dataset, batch_size=6, num_workers=0).dataset
    stacked.__getitems__([0])  # maps a shard
    copy = pickle.loads(pickle.dumps(stacked))
    assert len(copy._open) == 0
    got = copy.__getitems__([2, 0, 5])
    assert_same([got], [default_collate([dataset[i] for i in (2, 0, 5)])])


def test_a_collate_fn_given_reads_item_by_item(folder: ShardFolder) -> None:
    dataset = ShardDataset(folder.path, "train", SEQ)
    seen: list[list[dict[str, torch.Tensor]]] = []

    def record(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seen.append(items)
        return default_collate(items)

    loader = create_dataloader(dataset, batch_size=3, num_workers=0, seed=4, collate_fn=record)
    first = next(iter(loader))
    assert len(seen) == 1 and len(seen[0]) == 3
    assert all(sorted(item) == ["input_ids", "labels"] for item in seen[0])
    assert all(item["input_ids"].shape == (SEQ,) for item in seen[0])
    order = loader.sampler.epoch_indices()[:3]
    assert_same([first], [default_collate([dataset[i] for i in order])])


def test_a_dataset_without_stacked_batches_keeps_default_collate() -> None:
    class Squares(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.tensor([i * i])}

    loader = create_dataloader(Squares(), batch_size=4, num_workers=0, shuffle=False)
    assert loader.collate_fn is default_collate
    assert [b["x"].flatten().tolist() for b in loader] == [[0, 1, 4, 9], [16, 25, 36, 49]]
