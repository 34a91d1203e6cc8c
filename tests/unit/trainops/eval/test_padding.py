"""pad_collate: equal rows stack as default_collate does; unequal rows pad to ignored targets."""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from apt.trainops.eval import PaddedForRanks, pad_collate

IGNORE = -100


def test_rows_of_one_length_stack_as_they_are() -> None:
    rows = [{"input_ids": torch.arange(4), "labels": torch.arange(1, 5)} for _ in range(3)]
    got, want = pad_collate(rows), default_collate(rows)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_dict_without_labels_gets_its_own_before_padding() -> None:
    batch = pad_collate([{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    # The next tokens, the last real position and the padding ignored: never "predict pad".
    assert batch["labels"].tolist() == [[6, 7, IGNORE], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_labels_and_masks_given_are_kept_and_extended() -> None:
    batch = pad_collate(
        [
            {
                "input_ids": torch.tensor([1, 2]),
                "labels": torch.tensor([2, 3]),
                "attention_mask": torch.tensor([1, 0]),
            },
            {"input_ids": torch.tensor([4, 5, 6]), "labels": torch.tensor([5, 6, 7])},
        ]
    )
    assert batch["labels"].tolist() == [[2, IGNORE, IGNORE], [5, 6, 7]]  # masked position too
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_pairs_pad_inputs_with_zero_and_targets_with_ignore() -> None:
    inputs, targets = pad_collate([(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])), ([9], [1])])
    assert inputs.tolist() == [[1, 2, 3], [9, 0, 0]]
    assert targets.tolist() == [[2, 3, 4], [1, IGNORE, IGNORE]]


def test_padded_for_ranks_adds_target_free_copies() -> None:
    data = [(torch.tensor([i]), torch.tensor([i])) for i in range(5)]
    padded = PaddedForRanks(data, 4, lambda s: (s[0], torch.full_like(s[1], IGNORE)))
    assert len(padded) == 8
    assert [int(padded[i][1]) for i in range(8)] == [0, 1, 2, 3, 4, IGNORE, IGNORE, IGNORE]


def test_a_target_free_row_among_rows_without_labels_stays_target_free() -> None:
    # What PaddedForRanks adds to a dataset of {"input_ids"} rows: default_collate would drop
    # its labels (it keeps the first row's keys) and score the padding row as a real one.
    real = {"input_ids": torch.tensor([1, 2, 3])}
    pad = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.full((3,), IGNORE)}
    batch = pad_collate([real, pad])
    assert batch["labels"].tolist() == [[2, 3, IGNORE], [IGNORE] * 3]
