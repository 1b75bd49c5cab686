"""Padding-free ("packed") training passes: when a run packs its batches (TRL's `padding_free`).

A packed pass concatenates its sequences into one row with `position_ids` restarting at 0 per sequence and no
attention mask (`kllama.data.collate.pack_batch`); transformers (>= 4.56) then masks attention block-diagonally from
the position_ids (sdpa / eager / flex) or runs flash-attention's varlen kernel, so the numbers are those of the padded
batch (tests/train/test_packing.py pins it). With routed experts held in host RAM every pass pays a fixed copy of the
streamed layers, and padding both wastes a pass's token budget (more passes a step) and inflates its activations
(the GPU memory `kllama.train.promotion` has to leave free), so such runs pack by default; runs with every expert
resident keep the padded layout unless `padding_free: true`.
"""
from __future__ import annotations

from typing import Any

from kllama.errors import KllamaError
from kllama.train.micro_batching import expert_passes

# transformers' attention implementations that take packed sequences from position_ids without an attention mask
PACKED_ATTENTION: frozenset[str] = frozenset({"sdpa", "eager", "flash_attention_2", "flex_attention"})


def padding_free_for(config: Any, engine: Any, attn_implementation: str | None) -> bool:
    """Whether a training run packs its passes: the config's `padding_free` when set, else yes when routed experts
    are host-held (streamed or on the CPU) and the model's attention implementation supports packed rows."""
    choice = config.training.padding_free
    supported = attn_implementation in PACKED_ATTENTION
    if choice and not supported:
        raise KllamaError(f"padding_free: true needs an attention implementation that reads packed sequences from "
                          f"position_ids ({', '.join(sorted(PACKED_ATTENTION))}); this model runs "
                          f"{attn_implementation!r}: set flash_attn: sdpa, or padding_free: false")
    if choice is not None:
        return bool(choice)
    targets = expert_passes(engine.placements) if engine is not None and config.engine.use_kt else {}
    return supported and bool(targets.get("stream") or targets.get("cpu"))
