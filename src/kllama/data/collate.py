"""Batch collators: right-pad to a multiple of 8; preference batches stack all chosen rows, then all rejected."""
from __future__ import annotations

import torch

from kllama.data.templates import IGNORE_INDEX


def _pad(seqs: list[list[int]], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)  # [N, T]
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def _padded_length(seqs: list[list[int]], multiple: int | None) -> int:
    longest = max(len(s) for s in seqs)
    if multiple and multiple > 1:
        longest = -(-longest // multiple) * multiple
    return longest


def pad_batch(ids: list[list[int]], labels: list[list[int]], pad_token_id: int, multiple: int | None) -> dict:
    """Right-pad ids (with pad_token_id), labels (with -100) and build the attention mask; shapes [N, T]."""
    length = _padded_length(ids, multiple)
    mask = [[1] * len(s) for s in ids]
    return {
        "input_ids": _pad(ids, pad_token_id, length),
        "attention_mask": _pad(mask, 0, length),
        "labels": _pad(labels, IGNORE_INDEX, length),
    }


class PairwiseCollator:
    """Preference rows -> `{"input_ids" [2B, T], "attention_mask" [2B, T], "labels" [2B, T]}`: rows 0..B-1 are the
    chosen sequences, rows B..2B-1 the rejected ones in the same order (so pair i is rows i and B+i)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        return pad_batch(ids, labels, self.pad_token_id, self.pad_to_multiple_of)


class SFTCollator:
    """SFT rows -> `{"input_ids" [B, T], "attention_mask" [B, T], "labels" [B, T]}`."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch([f["input_ids"] for f in features], [f["labels"] for f in features],
                         self.pad_token_id, self.pad_to_multiple_of)
