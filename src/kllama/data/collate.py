"""Batch collators: right-pad to a multiple of 8 (preference batches stack all chosen rows, then all rejected), or
pack a batch's sequences into one row without padding (`packed=True`, see `pack_batch`)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Mapping

import numpy as np
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


def pack_batch(ids: list[list[int]], labels: list[list[int]], first_positions: list[int] | None = None,
               prefixes: list[tuple[int, int]] | None = None) -> dict:
    """The sequences concatenated into one row without padding (TRL's `padding_free`): `input_ids`, `labels`,
    `position_ids` and `sequence_index` (which sequence each token belongs to), all `[1, N]`, N the real tokens, and
    `sequence_bounds`, the offsets where each sequence starts plus N (a tuple of ints: known without a GPU sync).

    There is no `attention_mask`: transformers then reads the sequence boundaries from `position_ids` (restarting at
    0 per sequence) and builds a block-diagonal causal mask (sdpa / eager / flex) or runs flash-attention's varlen
    kernel, so each sequence attends only to itself. Each sequence's first label is IGNORE_INDEX: a position predicts
    the next position's label, and the last token of one sequence must not predict the first of the next (a padded
    row's first label is never a target either, so the targets are exactly those of `pad_batch`).

    Prefix sharing (`PairwiseCollator(share_prompts=True)`): `first_positions` gives each sequence's first position
    (default 0) and `prefixes` each sequence's `(start, stop)` of earlier rows of the packed row it attends to before
    its own (`(0, 0)`: none); they become `sequence_prefixes` (a tuple of pairs), which only
    `kllama.train.packing.per_sequence_sdpa` reads."""
    flat_labels = [t for seq in labels for t in [IGNORE_INDEX, *seq[1:]][:len(seq)]]
    firsts = first_positions or [0] * len(ids)
    batch = {
        "input_ids": torch.tensor([[t for seq in ids for t in seq]], dtype=torch.long),  # [1, N]
        "labels": torch.tensor([flat_labels], dtype=torch.long),  # [1, N]
        "position_ids": torch.cat([torch.arange(first, first + len(seq)) for first, seq in zip(firsts, ids)])[None],
        "sequence_index": torch.cat([torch.full((len(seq),), i) for i, seq in enumerate(ids)])[None],  # [1, N]
        "sequence_bounds": tuple(itertools.accumulate((len(seq) for seq in ids), initial=0)),  # S + 1 offsets
    }
    if prefixes is not None:
        batch["sequence_prefixes"] = tuple(prefixes)
    return batch


def shared_prompt_length(chosen_ids: Sequence[int], chosen_labels: Sequence[int], rejected_ids: Sequence[int],
                         rejected_labels: Sequence[int]) -> int:
    """P, the prompt tokens a pair's two sequences share: their common leading ids, limited to the leading
    IGNORE_INDEX labels of both (a token that is a target in either stays in both); 0 when P < 2 (nothing to
    save: the rejected sequence keeps the last prompt token either way). Lists or numpy arrays (the planner reads
    Arrow buffers)."""
    n = min(len(chosen_ids), len(rejected_ids), len(chosen_labels), len(rejected_labels))
    differs = ((np.asarray(chosen_ids[:n]) != np.asarray(rejected_ids[:n]))
               | (np.asarray(chosen_labels[:n]) != IGNORE_INDEX) | (np.asarray(rejected_labels[:n]) != IGNORE_INDEX))
    shared = int(differs.argmax()) if differs.any() else n
    return shared if shared >= 2 else 0


def pack_pairs_sharing_prompts(chosen_ids: list[list[int]], chosen_labels: list[list[int]],
                               rejected_ids: list[list[int]], rejected_labels: list[list[int]]) -> dict:
    """B pairs as one `pack_batch` row (chosen 0..B-1, then rejected B..2B-1) with each pair's shared prompt
    (`shared_prompt_length`, P tokens) computed once: chosen i is unchanged, rejected i keeps only the prompt's last
    token and its answer, at positions from P - 1, and attends to chosen i's first P - 1 rows (its
    `sequence_prefixes` entry) before its own, which is exactly what the full rejected sequence's tokens from P - 1
    on see. Its hidden states, labels and log-probs are then those of the unshared row, and so are the gradients
    (the prompt's keys and values get both answers' gradients through chosen i's rows). Pairs with P = 0 stay
    unshared.

    `logical_tokens` counts the tokens the pairs hold (the unshared row's length), so throughput stays comparable
    with unshared runs; `input_ids.numel()` is what the pass computes."""
    pairs = len(chosen_ids)
    shared = [shared_prompt_length(*seqs) for seqs in zip(chosen_ids, chosen_labels, rejected_ids, rejected_labels)]
    cut = [max(p - 1, 0) for p in shared]  # leading tokens each rejected sequence drops
    starts = list(itertools.accumulate((len(seq) for seq in chosen_ids), initial=0))  # chosen i's first row
    ids = chosen_ids + [seq[c:] for seq, c in zip(rejected_ids, cut)]
    labels = chosen_labels + [seq[c:] for seq, c in zip(rejected_labels, cut)]
    prefixes = [(0, 0)] * pairs + [(starts[i], starts[i] + cut[i]) if cut[i] else (0, 0) for i in range(pairs)]
    batch = pack_batch(ids, labels, first_positions=[0] * pairs + cut, prefixes=prefixes)
    batch["logical_tokens"] = batch["input_ids"].numel() + sum(cut)
    return batch


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether a batch is `pack_batch`'s one padding-free row (else `pad_batch`'s padded rows)."""
    return "sequence_index" in batch


def batch_sequences(batch: Mapping[str, Any]) -> int:
    """Sequences in a padded or packed batch."""
    return int(batch["sequence_index"][0, -1]) + 1 if is_packed(batch) else batch["input_ids"].shape[0]


def real_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens of a batch that are not padding (what its pass computes)."""
    return batch["input_ids"].numel() if is_packed(batch) else int(batch["attention_mask"].sum())


def data_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens of a batch's sequences as the data holds them: `real_tokens`, plus the prompt tokens a prefix-shared
    pass computes once for both answers of a pair (`logical_tokens`), so throughput compares with unshared runs."""
    return int(batch.get("logical_tokens", real_tokens(batch)))


def _collate(ids: list[list[int]], labels: list[list[int]], pad_token_id: int, multiple: int | None,
             packed: bool) -> dict:
    return pack_batch(ids, labels) if packed else pad_batch(ids, labels, pad_token_id, multiple)


class PairwiseCollator:
    """Preference rows -> `{"input_ids" [2B, T], "attention_mask" [2B, T], "labels" [2B, T]}`: rows 0..B-1 are the
    chosen sequences, rows B..2B-1 the rejected ones in the same order (so pair i is rows i and B+i); `packed`: the
    2B sequences in that order as one `pack_batch` row; `share_prompts` (packed only): each pair's prompt computed
    once (`pack_pairs_sharing_prompts`)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, packed: bool = False,
                 share_prompts: bool = False) -> None:
        if share_prompts and not packed:
            raise ValueError("prompt sharing needs packed passes")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed
        self.share_prompts = share_prompts

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.share_prompts:
            return pack_pairs_sharing_prompts(*([f[key] for f in features] for key in (
                "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")))
        ids = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        labels = [f["chosen_labels"] for f in features] + [f["rejected_labels"] for f in features]
        return _collate(ids, labels, self.pad_token_id, self.pad_to_multiple_of, self.packed)


class SFTCollator:
    """SFT rows -> `{"input_ids" [B, T], "attention_mask" [B, T], "labels" [B, T]}`; `packed`: one `pack_batch`
    row."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8, packed: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packed = packed

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return _collate([f["input_ids"] for f in features], [f["labels"] for f in features],
                        self.pad_token_id, self.pad_to_multiple_of, self.packed)
