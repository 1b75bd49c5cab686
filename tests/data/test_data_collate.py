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


def _pair(prompt_c: list[int], answer_c: list[int], prompt_r: list[int], answer_r: list[int],
          masked: int | None = None) -> dict:
    """A preference row: labels IGNORE over the first `masked` tokens (default: each sequence's prompt)."""
    def labels(ids: list[int], prompt: list[int]) -> list[int]:
        cut = len(prompt) if masked is None else masked
        return [IGNORE_INDEX] * cut + ids[cut:]

    chosen, rejected = prompt_c + answer_c, prompt_r + answer_r
    return {"chosen_input_ids": chosen, "chosen_labels": labels(chosen, prompt_c),
            "rejected_input_ids": rejected, "rejected_labels": labels(rejected, prompt_r)}


def test_shared_prompt_length_is_the_common_masked_prefix():
    from kllama.data.collate import shared_prompt_length

    def length(row: dict) -> int:
        return shared_prompt_length(row["chosen_input_ids"], row["chosen_labels"], row["rejected_input_ids"],
                                    row["rejected_labels"])

    assert length(_pair([1, 2, 3, 4], [10, 11], [1, 2, 3, 4], [20])) == 4
    assert length(_pair([1, 2, 3], [50, 51], [1, 2, 3], [50, 52])) == 3  # equal answer starts are targets: kept
    assert length(_pair([1, 2, 3], [50, 51], [1, 2, 3], [50, 52], masked=4)) == 4
    assert length(_pair([5, 6], [30], [5, 9], [31])) == 0  # P = 1: nothing to save
    assert length(_pair([8, 9], [40], [7, 9], [41])) == 0  # prompts differ from the first token


def test_pairwise_collator_sharing_prompts_layout():
    """Chosen sequences unchanged; a rejected one with a shared prompt of P tokens keeps the prompt's last token and
    its answer, positions from P - 1, and the chosen sequence's first P - 1 rows as its prefix; a pair whose prompts
    differ (or share one token) stays whole."""
    features = [_pair([1, 2, 3, 4], [10, 11], [1, 2, 3, 4], [20, 21, 22]),  # P = 4
                _pair([5, 6, 7], [30], [5, 9, 7], [31, 32]),                # P = 1: unshared
                _pair([8, 9, 3], [40, 41], [8, 9, 3], [42])]                # P = 3
    batch = PairwiseCollator(pad_token_id=0, packed=True, share_prompts=True)(features)
    I = IGNORE_INDEX  # noqa: E741
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 10, 11, 5, 6, 7, 30, 8, 9, 3, 40, 41,
                                            4, 20, 21, 22, 5, 9, 7, 31, 32, 3, 42]]
    assert batch["labels"].tolist() == [[I, I, I, I, 10, 11, I, I, I, 30, I, I, I, 40, 41,
                                         I, 20, 21, 22, I, I, I, 31, 32, I, 42]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4,
                                               3, 4, 5, 6, 0, 1, 2, 3, 4, 2, 3]]
    assert batch["sequence_bounds"] == (0, 6, 10, 15, 19, 24, 26)
    assert batch["sequence_prefixes"] == ((0, 0), (0, 0), (0, 0), (0, 3), (0, 0), (10, 12))
    assert batch["sequence_index"].tolist() == [[0] * 6 + [1] * 4 + [2] * 5 + [3] * 4 + [4] * 5 + [5] * 2]
    # the data's tokens (what throughput counts): the unshared row's 26 + 3 + 2
    unshared = PairwiseCollator(pad_token_id=0, packed=True)(features)
    assert unshared["input_ids"].numel() == batch["logical_tokens"] == 31
    from kllama.data.collate import data_tokens, real_tokens

    assert (real_tokens(batch), data_tokens(batch), data_tokens(unshared)) == (26, 31, 31)
