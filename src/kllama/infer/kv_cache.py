"""A paged KV cache for many sequences decoded together in one packed forward.

Every step packs the new tokens of all running sequences into one row (`input_ids [1, N]`), so the model — and the
expert engine inside it — sees the batch's whole token count in one pass. The cache keeps each layer's keys and
values in one pool `[heads, slots, dim]`, handed out to sequences in blocks of `block_size` token slots. Before a
forward, `plan()` reserves the slots the step writes and builds what the model needs: per-token `position_ids`, the
pool slots to write (`write_index [N]`) and to read (`read_index [KV]`: every cached token of the step's sequences,
sequence after sequence) and a 4D mask `[1, 1, N, KV]` letting each token see only its own sequence's past.
transformers returns a 4D mask unchanged, and each attention layer calls `update()`, which writes the new keys
and values and returns the gathered ones; nothing else of the cache is used.

The cache stores whatever an attention layer hands to `update` (full keys/values, or DeepSeek's compressed MLA
latents in transformers >= 5.24), so it serves every family without knowing its attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kllama.errors import KllamaError

# attention implementation -> how it takes a custom 4D mask: True = attend (bool) or an additive float mask
BOOL_MASK_ATTENTION = {"sdpa": True, "eager": False}


@dataclass
class StepPlan:
    """What one packed forward needs; built by `PagedKVCache.plan`."""

    position_ids: Tensor  # [1, N] position of each new token in its own sequence
    attention_mask: Tensor  # [1, 1, N, KV] bool (True = attend) or additive float
    last_index: Tensor  # [M] index (in the N new tokens) of each sequence's last new token
    tokens: int  # N


@dataclass
class _Slots:
    blocks: list[int]
    slots: Tensor  # [len(blocks) * block_size] pool slot of each position, on the cache's device
    length: int = 0  # positions holding keys/values


class PagedKVCache:
    """Keys/values of many sequences, in per-layer pools grown on demand (block size `block_size` tokens)."""

    def __init__(self, device: torch.device, *, bool_mask: bool = True, mask_dtype: torch.dtype = torch.float32,
                 sliding_window: int | None = None, block_size: int = 16, initial_blocks: int = 64) -> None:
        self.device = device
        self.bool_mask = bool_mask
        self.mask_dtype = mask_dtype
        self.sliding_window = sliding_window
        self.block_size = block_size
        self.num_blocks = self._initial_blocks = initial_blocks
        self._free = list(range(initial_blocks - 1, -1, -1))  # pop() hands out low blocks first
        self._seqs: dict[int, _Slots] = {}
        self._pools: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (keys [h, slots, dk], values [h, slots, dv])
        self._write: Tensor | None = None  # [N] pool slots the current step writes
        self._read: Tensor | None = None  # [KV] pool slots the current step reads
        self._pending: list[tuple[int, int]] = []

    # --- sequences -------------------------------------------------------------------------------------------
    def length(self, seq_id: int) -> int:
        """Tokens cached for `seq_id` (0 for an unknown sequence)."""
        entry = self._seqs.get(seq_id)
        return entry.length if entry is not None else 0

    def free(self, seq_id: int) -> None:
        """Forget a sequence and give its blocks back; the last one out drops pools grown past the initial size
        (a burst of long requests does not keep its memory)."""
        entry = self._seqs.pop(seq_id, None)
        if entry is not None:
            self._free.extend(reversed(entry.blocks))
        if not self._seqs and self.num_blocks > self._initial_blocks and not self._pending:
            self.num_blocks = self._initial_blocks
            self._free = list(range(self.num_blocks - 1, -1, -1))
            self._pools.clear()

    @property
    def sequences(self) -> int:
        """Sequences holding cache blocks."""
        return len(self._seqs)

    @property
    def capacity(self) -> int:
        """Token slots of each layer's pool."""
        return self.num_blocks * self.block_size

    def _reserve(self, seq_id: int, new_tokens: int) -> _Slots:
        entry = self._seqs.setdefault(seq_id, _Slots([], torch.empty(0, dtype=torch.long, device=self.device)))
        need = math.ceil((entry.length + new_tokens) / self.block_size) - len(entry.blocks)
        if need <= 0:
            return entry
        if need > len(self._free):
            self._grow(need - len(self._free))
        blocks = [self._free.pop() for _ in range(need)]
        starts = torch.tensor(blocks, dtype=torch.long, device=self.device) * self.block_size
        fresh = (starts[:, None] + torch.arange(self.block_size, device=self.device)).reshape(-1)
        entry.blocks.extend(blocks)
        entry.slots = torch.cat([entry.slots, fresh])
        return entry

    def _grow(self, at_least: int) -> None:
        # Double the pools (amortised); layers copy their pool lazily at their next update.
        added = max(self.num_blocks, at_least)
        self._free = list(range(self.num_blocks + added - 1, self.num_blocks - 1, -1)) + self._free
        self.num_blocks += added

    # --- one step --------------------------------------------------------------------------------------------
    def plan(self, segments: list[tuple[int, int]]) -> StepPlan:
        """Reserve slots for a step that feeds `segments` = [(seq_id, new_tokens), ...] (packed in this order) and
        build its positions, mask and gather indices. `commit()` after the forward records the tokens as cached."""
        if not segments or any(n < 1 for _, n in segments):
            raise ValueError(f"every segment needs at least one token, got {segments}")
        device = self.device
        writes, reads, q_pos, q_len, kv_len = [], [], [], [], []
        for seq_id, n in segments:
            entry = self._reserve(seq_id, n)
            start = entry.length
            writes.append(entry.slots[start:start + n])
            reads.append(entry.slots[:start + n])
            q_pos.extend(range(start, start + n))
            q_len.append(n)
            kv_len.append(start + n)
        n_tokens, kv_total, m = len(q_pos), sum(kv_len), len(segments)
        self._write, self._read = torch.cat(writes), torch.cat(reads)
        self._pending = list(segments)
        # One host-to-device copy for the step's small index data.
        meta = torch.tensor(q_pos + q_len + kv_len, dtype=torch.long).to(device)
        positions, q_lens, kv_lens = meta[:n_tokens], meta[n_tokens:n_tokens + m], meta[n_tokens + m:]  # [N] [M] [M]
        ids = torch.arange(m, device=device)
        q_seq = torch.repeat_interleave(ids, q_lens, output_size=n_tokens)  # [N] sequence of each new token
        k_seq = torch.repeat_interleave(ids, kv_lens, output_size=kv_total)  # [KV] sequence of each cached token
        starts = torch.cumsum(kv_lens, 0) - kv_lens
        k_pos = torch.arange(kv_total, device=device) - torch.repeat_interleave(starts, kv_lens, output_size=kv_total)
        allowed = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= positions[:, None])  # [N, KV]
        if self.sliding_window is not None:
            allowed &= k_pos[None, :] > positions[:, None] - self.sliding_window
        mask = allowed if self.bool_mask else torch.zeros(allowed.shape, dtype=self.mask_dtype, device=device).masked_fill(
            ~allowed, torch.finfo(self.mask_dtype).min)
        last = torch.cumsum(q_lens, 0) - 1  # [M]
        return StepPlan(positions[None, :], mask[None, None], last, n_tokens)

    def abort(self) -> None:
        """The planned step's forward failed: nothing of it counts as cached (its slots stay reserved)."""
        self._pending, self._write, self._read = [], None, None

    def commit(self) -> None:
        """The planned step's forward ran: its tokens are cached now."""
        for seq_id, n in self._pending:
            self._seqs[seq_id].length += n
        self._pending, self._write, self._read = [], None, None

    # --- what the model's attention layers call --------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        """Write this step's keys/values `[1, h, N, d]` of layer `layer_idx`; return the step's sequences' cached
        keys/values `[1, h, KV, d]` (the layout the 4D mask of `plan` describes)."""
        if self._write is None or self._read is None:
            raise RuntimeError("PagedKVCache.update called outside a planned step")
        if key_states.shape[0] != 1:
            raise KllamaError("the paged KV cache takes packed input (batch dimension 1)")
        keys, values = self._pool(layer_idx, key_states, value_states)
        keys.index_copy_(1, self._write, key_states[0])
        values.index_copy_(1, self._write, value_states[0])
        return keys.index_select(1, self._read)[None], values.index_select(1, self._read)[None]

    def _pool(self, layer_idx: int, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        pools = self._pools.get(layer_idx)
        if pools is not None and pools[0].shape[1] >= self.capacity:
            return pools
        fresh = tuple(
            torch.zeros(s.shape[1], self.capacity, s.shape[3], dtype=s.dtype, device=s.device)
            for s in (key_states, value_states)
        )
        if pools is not None:  # grown: keep what is cached
            for new, old in zip(fresh, pools):
                new[:, : old.shape[1]] = old
        self._pools[layer_idx] = fresh  # type: ignore[assignment]
        return fresh  # type: ignore[return-value]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """transformers asks this only to derive positions we pass explicitly; 0 keeps its arithmetic harmless."""
        return 0

    def pool_bytes(self) -> int:
        """Bytes held by the pools of every layer."""
        return sum(t.numel() * t.element_size() for pair in self._pools.values() for t in pair)
