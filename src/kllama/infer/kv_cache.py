"""The KV cache of `kllama chat` and `kllama api`: a fixed number of slots x positions for every attention layer.

One sequence owns one slot from its first prompt token to its last answer token; position p of the sequence is
row `slot * capacity + p` of each layer's storage `[slots * capacity, heads, dim]`. The storage is made once, at the
first forward, so its addresses never change and a decode step over it can be captured as a CUDA graph
(graphs.py). A forward reads the cache in one of two ways, set by the decoder before it runs:

* **rows** (`view = (slots, positions)`, two slices): the layer returns `[B, heads, L, dim]` views of slots
  `slots` at positions `0..L-1`, no copy. One-token decode steps and a prompt read into one slot use it, with a 4-D
  mask `[B, 1, T, L]`.
* **packed** (`read_index [KV]`): the step's tokens of several sequences are packed into one row `[1, N]` and the
  layer gathers each sequence's cached positions `[1, heads, KV, dim]`; the mask `[1, 1, N, KV]` lets each token
  see only its own sequence's past (`packed_layout`). Steps that read newcomers' prompts (together with the running
  answers' next tokens) use it, so the expert engine sees all their tokens in one pass.

Either way the new tokens' keys/values are written first, with one `index_copy_` at `write_index` (flat rows).
transformers returns a 4-D mask unchanged, and each attention layer calls `update()`; nothing else of the cache is
used. The cache stores whatever a layer hands to `update` (full keys/values, or DeepSeek's compressed MLA latents in
transformers >= 5.24), so it serves every family without knowing its attention.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, StaticLayer

from kllama.errors import KllamaError

# attention implementation -> how it takes a custom 4D mask: True = attend (bool) or an additive float mask
BOOL_MASK_ATTENTION = {"sdpa": True, "eager": False}


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside `model` (itself, or the one a PEFT wrapper holds)."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise KllamaError(f"{type(model).__name__} holds no transformers model; give a transformers causal LM")


def cache_argument(model: PreTrainedModel) -> str:
    """The forward keyword that takes the KV cache: `cache` (transformers >= 5.24) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window every layer of the model uses (None = full attention); models mixing windowed and full
    layers are refused, since one mask serves every layer."""
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        raise KllamaError(f"model type {config.model_type!r} mixes attention kinds {sorted(kinds)}; kllama's batched "
                          "decoding needs every layer to attend alike. Serve it with infer_backend: huggingface "
                          "through another server, or set use_sliding_window: false in its config.json")
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def attention_mask(allowed: Tensor, bool_mask: bool, dtype: torch.dtype) -> Tensor:
    """The 4-D mask an attention implementation takes: `allowed` itself (sdpa) or additive (eager)."""
    if bool_mask:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclass
class PackedLayout:
    """Where the tokens of one packed forward go and what they see; built by `packed_layout`."""

    position_ids: Tensor  # [1, N] position of each new token in its own sequence
    write_index: Tensor  # [N] storage row of each new token
    read_index: Tensor  # [KV] storage rows read: every cached position of the step's sequences, one after another
    allowed: Tensor  # [1, 1, N, KV] True where a token may attend
    last_index: Tensor  # [M] index (in the N new tokens) of each sequence's last new token


def packed_layout(segments: list[tuple[int, int, int]], capacity: int, device: torch.device,
                  window: int | None = None) -> PackedLayout:
    """The layout of a packed forward feeding `segments` = [(slot, start, new_tokens), ...] (in this order): each
    sequence's new tokens at positions `start..start+n-1` of its slot, attending to positions `0..` of that slot
    only (causal, within `window` when the model has one). One host-to-device copy."""
    if not segments or any(n < 1 for _, _, n in segments):
        raise ValueError(f"every segment needs at least one token, got {segments}")
    q_pos = [p for _, start, n in segments for p in range(start, start + n)]
    q_len = [n for _, _, n in segments]
    kv_len = [start + n for _, start, n in segments]
    slots = [slot for slot, _, _ in segments]
    n_tokens, kv_total, m = len(q_pos), sum(kv_len), len(segments)
    meta = torch.tensor(q_pos + q_len + kv_len + slots, dtype=torch.long).to(device)
    positions, q_lens = meta[:n_tokens], meta[n_tokens:n_tokens + m]  # [N] [M]
    kv_lens, slot_ids = meta[n_tokens + m:n_tokens + 2 * m], meta[n_tokens + 2 * m:]  # [M] [M]
    ids = torch.arange(m, device=device)
    q_seq = torch.repeat_interleave(ids, q_lens, output_size=n_tokens)  # [N] sequence of each new token
    k_seq = torch.repeat_interleave(ids, kv_lens, output_size=kv_total)  # [KV] sequence of each read position
    starts = torch.cumsum(kv_lens, 0) - kv_lens
    k_pos = torch.arange(kv_total, device=device) - torch.repeat_interleave(starts, kv_lens, output_size=kv_total)
    allowed = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= positions[:, None])  # [N, KV]
    if window is not None:
        allowed &= k_pos[None, :] > positions[:, None] - window
    return PackedLayout(positions[None, :], slot_ids[q_seq] * capacity + positions, slot_ids[k_seq] * capacity + k_pos,
                        allowed[None, None], torch.cumsum(q_lens, 0) - 1)


class _SlotLayer(StaticLayer):
    """One layer of a SlotCache: keys/values stored as `[slots * capacity, heads, dim]` rows."""

    def __init__(self, cache: "SlotCache") -> None:
        super().__init__(max_cache_len=cache.capacity)
        self._cache = cache

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        slots, capacity = self._cache.slots, self.max_cache_len
        self.device = key_states.device
        self.key_rows = key_states.new_zeros(slots * capacity, key_states.shape[1], key_states.shape[3])
        self.value_rows = value_states.new_zeros(slots * capacity, value_states.shape[1], value_states.shape[3])
        self.keys = self.key_rows.view(slots, capacity, *self.key_rows.shape[1:]).transpose(1, 2)
        self.values = self.value_rows.view(slots, capacity, *self.value_rows.shape[1:]).transpose(1, 2)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cache = self._cache
        self.key_rows.index_copy_(0, cache.write_index, key_states.transpose(1, 2).reshape(-1, *self.key_rows.shape[1:]))
        self.value_rows.index_copy_(0, cache.write_index,
                                    value_states.transpose(1, 2).reshape(-1, *self.value_rows.shape[1:]))
        if cache.read_index is not None:  # packed: [1, heads, KV, dim]
            return (self.key_rows.index_select(0, cache.read_index).transpose(0, 1)[None],
                    self.value_rows.index_select(0, cache.read_index).transpose(0, 1)[None])
        rows, positions = cache.view
        return self.keys[rows, :, positions], self.values[rows, :, positions]

    def get_seq_length(self) -> int:
        return 0  # positions are always given explicitly


class SlotCache(Cache):
    """Static KV cache of `slots` x `capacity` positions for every attention layer (see the module docstring).
    `write_index` and either `view` (rows) or `read_index` (packed) are set by the decoder before each forward."""

    def __init__(self, num_layers: int, slots: int, capacity: int) -> None:
        self.slots, self.capacity = slots, capacity
        self.write_index: Tensor | None = None
        self.view: tuple[slice, slice] = (slice(0, slots), slice(0, capacity))
        self.read_index: Tensor | None = None
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def set_rows(self, write_index: Tensor, rows: slice, length: int) -> None:
        """The next forward writes at `write_index` and reads positions `0..length-1` of slots `rows`."""
        self.write_index, self.view, self.read_index = write_index, (rows, slice(0, length)), None

    def set_packed(self, write_index: Tensor, read_index: Tensor) -> None:
        """The next forward writes at `write_index` and reads the storage rows `read_index`, packed."""
        self.write_index, self.read_index = write_index, read_index

    @torch.inference_mode()
    def move(self, source: int, target: int, length: int) -> None:
        """Copy positions `0..length-1` of slot `source` into slot `target` in every layer (a sequence changes slot)."""
        src = slice(source * self.capacity, source * self.capacity + length)
        dst = slice(target * self.capacity, target * self.capacity + length)
        for layer in self.layers:
            if layer.is_initialized:
                layer.key_rows[dst] = layer.key_rows[src]
                layer.value_rows[dst] = layer.value_rows[src]

    def nbytes(self) -> int:
        """Bytes the storage of every layer holds (0 before the first forward)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.key_rows, layer.value_rows))
