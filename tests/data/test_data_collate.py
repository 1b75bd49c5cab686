"""Collators: [all chosen, all rejected], right padding to a multiple of 8, labels padded with -100."""
from __future__ import annotations

import torch

from kllama.data import IGNORE_INDEX, PairwiseCollator, SFTCollator


def test_pairwise_collator_layout():
    features = [
        {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
         "rejected_input_ids": [1, 2, 4, 5], "rejected_labels": [-100, 2, 4, 5]},
        {"chosen_input_ids": list(range(10, 19)), "chosen_labels": [-100] * 4 + list(range(14, 19)),
         "rejected_input_ids": [10, 11], "rejected_labels": [-100, 11]},
    ]
    batch = PairwiseCollator(pad_token_id=0)(features)
    assert batch["input_ids"].shape == (4, 16)  # longest is 9 -> next multiple of 8
    assert batch["input_ids"][0, :3].tolist() == [1, 2, 3]          # chosen 0
    assert batch["input_ids"][1, :9].tolist() == list(range(10, 19))  # chosen 1
    assert batch["input_ids"][2, :4].tolist() == [1, 2, 4, 5]        # rejected 0
    assert batch["input_ids"][3, :2].tolist() == [10, 11]            # rejected 1
    assert batch["input_ids"][3, 2:].eq(0).all()
    assert batch["attention_mask"].sum(1).tolist() == [3, 9, 4, 2]
    assert batch["labels"][0].tolist() == [-100, 2, 3] + [IGNORE_INDEX] * 13
    assert batch["input_ids"].dtype == torch.long


def test_sft_collator_and_no_multiple():
    features = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7, 8, 9], "labels": [-100, 8, 9]}]
    batch = SFTCollator(pad_token_id=99, pad_to_multiple_of=None)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 99], [7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, -100], [-100, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert SFTCollator(pad_token_id=0)(features)["input_ids"].shape == (2, 8)
