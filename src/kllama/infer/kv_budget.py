"""How many tokens a sequence's KV-cache slot gets when `kt_maxlen` is left at its default and the cache would not fit.

The slot cache (kv_cache.py) is allocated at start for every sequence decoded together: `slots x (kt_maxlen + 1)`
positions x the model's bytes per cached token (DeepSeek-V2-Lite: 270 KiB under transformers 5.17, which caches full
keys/values; 30 KiB under 5.24, which caches the compressed latents). On a GPU that is tens of GiB at the default
32 x 4,096; a card with less room left after the weights would fail at the first allocation. So when the user did not
set `kt_maxlen`, the engine lowers it to the largest power of two (at least MIN_POSITIONS) that fits the GPU memory
left beyond a reserve for prefill activations, decode graphs and, with experts held in host RAM, the expert
engine's two stream slots; one warning says so and names the two settings that size the cache. A `kt_maxlen` the
user set is kept (a cache that does not fit is then one error naming both settings).
"""
from __future__ import annotations

import logging

import torch

from kllama.infer.graphs import GraphedDecoder
from kllama.model.engine_setup import inference_reserve_bytes
from kllama.model.load import LoadedModel

logger = logging.getLogger(__name__)

MIN_POSITIONS = 256  # never lowered below this: shorter slots could not hold an ordinary chat turn
ACTIVATION_RESERVE = 2 * 2**30  # prefill activations and decode graphs, when no expert engine gives its own reserve


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one cached token takes over every layer (measured: a one-slot, one-position cache is made)."""
    probe = GraphedDecoder(model, 1, 1, use_graphs=False)
    return probe.allocate() // probe.capacity


def fit_positions(requested: int, slots: int, bytes_per_token: int, budget_bytes: int) -> int:
    """`requested` when `slots x (requested + 1)` tokens fit `budget_bytes`, else the largest power of two of at
    least MIN_POSITIONS below it that fits, else 0."""
    def fits(positions: int) -> bool:
        return slots * (positions + 1) * bytes_per_token <= budget_bytes

    if fits(requested):
        return requested
    positions = 1 << (requested.bit_length() - 1)  # the power of two at or below `requested`
    if positions == requested:
        positions //= 2
    while positions >= MIN_POSITIONS and not fits(positions):
        positions //= 2
    return positions if positions >= MIN_POSITIONS else 0


def gpu_room_bytes(device: torch.device, cap_bytes: int | None) -> int:
    """GPU memory this process can still allocate on `device`: what the card has free plus the allocator's cached
    blocks, and no more than `cap_bytes` (max_gpu_memory) minus what is allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    room = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if cap_bytes is not None:
        room = min(room, cap_bytes - torch.cuda.memory_allocated(device))
    return room


def reserve_bytes(loaded: LoadedModel) -> int:
    """GPU memory kept free of the KV cache: the expert engine's inference reserve (two stream slots + 2 GiB) when
    some layer's experts live in host RAM, else 2 GiB."""
    engine = loaded.engine
    if engine is not None and any(module.placement.short != "gpu" or module.placement.long != "gpu"
                                  for module in engine.modules.values()):
        return inference_reserve_bytes(engine)
    return ACTIVATION_RESERVE


def fitted_positions(loaded: LoadedModel, slots: int, requested: int, room_bytes: int) -> int:
    """Tokens per slot for a cache of `slots` slots when `requested` is the default: `requested` if it fits
    `room_bytes` minus the reserve, else lowered (with a warning); `requested` again when even MIN_POSITIONS does
    not fit (allocation then fails with the error naming the settings)."""
    per_token = kv_bytes_per_token(loaded.model)
    budget = room_bytes - reserve_bytes(loaded)
    positions = fit_positions(requested, slots, per_token, budget)
    if positions == requested or positions == 0:
        return requested
    gib = 2**30
    logger.warning("KV cache: %d sequences x %d tokens would take %.1f GiB and %.1f GiB of GPU memory is free beyond a "
                   "%.1f GiB reserve, so each sequence gets %d tokens (kt_maxlen); set kt_maxlen, or API_MAX_BATCH "
                   "for fewer sequences, to choose", slots, requested, slots * (requested + 1) * per_token / gib,
                   max(budget, 0) / gib, reserve_bytes(loaded) / gib, positions)
    return positions
