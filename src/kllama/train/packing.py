"""Padding-free ("packed") training passes: when a run packs its batches (TRL's `padding_free`).

A packed pass concatenates its sequences into one row with `position_ids` restarting at 0 per sequence and no
attention mask (`kllama.data.collate.pack_batch`); transformers (>= 4.56) then masks attention block-diagonally from
the position_ids (sdpa / eager / flex) or runs flash-attention's varlen kernel, so the numbers are those of the padded
batch (tests/train/test_packing.py pins it). With routed experts held in host RAM every pass pays a fixed copy of the
streamed layers, and padding both wastes a pass's token budget (more passes a step) and inflates its activations
(the GPU memory `kllama.train.promotion` has to leave free), so such runs pack by default; runs with every expert
resident keep the padded layout unless `padding_free: true` (`padding_free_for`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kllama.errors import KllamaError
from kllama.model.attention import SHAPE_STABLE_BACKENDS
from kllama.train.micro_batching import expert_passes

# transformers' attention implementations that take packed sequences from position_ids without an attention mask
PACKED_ATTENTION: frozenset[str] = frozenset({"sdpa", "eager", "flash_attention_2", "flex_attention"})


def padding_free_for(config: Any, engine: Any, attn_implementation: str | None) -> bool:
    """Whether a training run packs its passes: the config's `padding_free` when set (refused with one clear error
    when the model's attention cannot read packed rows), else yes when routed experts are host-held (streamed or on
    the CPU) and the attention implementation supports packed rows.

    Measured on the H200 box (2026-11-30, seed DPO YAML, V2-Lite shape, `max_gpu_memory: 24GB`, the same box and
    data in one call): padded 6,446 tok/s, packed 7,296 (1.13x), packed with `precompute_ref_log_probs` 7,818. The
    packed runs were once 4x slower (a cuDNN attention plan built per sequence shape, `PACKED_BACKENDS`)."""
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


def prefix_sharing_for(config: Any, packed: bool, attn_implementation: str | None) -> bool:
    """Whether a DPO-family run computes each pair's prompt once (`prefix_sharing`,
    `kllama.data.collate.pack_pairs_sharing_prompts`): only in packed passes run by `per_sequence_sdpa` (the one
    attention that reads `SEQUENCE_PREFIXES`). Unset, wherever that holds; asked for anywhere else, a clear error
    naming the fix.

    Measured on the H200 box (2026-11-30, seed DPO YAML, V2-Lite shape, `max_gpu_memory: 24GB`, one call each):
    8,558 tok/s shared against 8,108 unshared, then 9,229 against 8,961 after the split and bf16-branch changes;
    shared with `precompute_ref_log_probs` 11,007 (`benchmarks/NOTES.md`, ninth session); tenth session, as the
    default with `precompute_ref_log_probs`, 12,070 shared against 10,283 with `prefix_sharing: false`."""
    choice = config.finetuning.prefix_sharing
    if choice is None:
        return packed and attn_implementation == "sdpa"
    if not choice:
        return False
    if not packed:
        raise KllamaError("prefix_sharing: true needs packed passes, and this run pads them (padding_free: false, "
                          "or every expert resident without padding_free): set padding_free: true, or remove "
                          "prefix_sharing")
    if attn_implementation != "sdpa":
        raise KllamaError(f"prefix_sharing: true needs the sdpa attention (kllama runs packed sdpa per sequence and "
                          f"gives it the shared prompt); this model runs {attn_implementation!r}: set flash_attn: "
                          f"sdpa, or remove prefix_sharing")
    return True


# The keyword a packed forward passes down to the attention functions (`pack_batch`'s `sequence_bounds`)
SEQUENCE_BOUNDS = "kllama_sequence_bounds"
# The keyword for `pack_batch`'s `sequence_prefixes`: per sequence, a (start, stop) of earlier rows it attends to
# before its own (a rejected answer's shared prompt, held by its chosen sequence's rows)
SEQUENCE_PREFIXES = "kllama_sequence_prefixes"

# The kernels a packed row's per-sequence calls may use: every sdpa backend but cuDNN's (`kllama.model.attention`:
# the slices of a packed row differ in length and their strides carry the row's total length, which changes every
# step, so cuDNN built a plan for every call of every step; 4.6 s a micro-step against 0.32 s on the H200 box).
PACKED_BACKENDS = SHAPE_STABLE_BACKENDS


# The widest head torch's flash kernel takes (q, k and v alike, a multiple of 8)
FLASH_MAX_HEAD_DIM = 256


def flash_value_width(query_dim: int, value_dim: int, device_type: str) -> int:
    """The head width a packed row's `value` is zero-padded to: query's where only v's narrower head keeps torch's
    flash kernel out (CUDA; MLA's v is 128 wide, its q and k 192), else v's own.

    Flash needs q, k and v equally wide; without it a 192-wide head falls to the memory-efficient kernel, whose
    backward for heads over 128 is its slow generic variant: on the H200 box (`benchmarks/packed_pass.py --layers 4`,
    packed, 13,105 real tokens, 2026-11-30) `_efficient_attention_backward` took 50.3 ms of the 0.320 s step, 12.6 ms a
    layer, ~11 TFLOP/s, while cuDNN's fused kernel on the same shapes did not show among the top ops. Zero columns of v
    add zero columns to the output, which are cut off again; the scores (q, k, `scaling`) are unchanged."""
    if device_type == "cuda" and value_dim < query_dim <= FLASH_MAX_HEAD_DIM and query_dim % 8 == 0:
        return query_dim
    return value_dim


def per_sequence_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, run sequence by sequence (causal, no mask) for a packed row.

    For a packed row sdpa gets the block-diagonal mask as a dense [N, N] bias, and torch's kernels compute every
    block of it: N^2 scores where the sequences need sum(T_i^2) / 2 (a 6,200-token pass of 16 sequences: ~38M against
    ~1.2M; more than the padded batch's B x T^2 too). Here each sequence (`SEQUENCE_BOUNDS` in the keywords) runs
    causal on its own slice, which is exactly the masked computation. Any other call (no bounds: padded batches,
    inference) goes to transformers' function unchanged. The per-sequence calls never use cuDNN's kernel
    (`PACKED_BACKENDS`), and on CUDA a narrower v is padded so flash can run them (`flash_value_width`). A sequence
    with a prefix (`SEQUENCE_PREFIXES`: prefix sharing) also attends to those rows first (`sequence_attention`).
    `query` `[1, H, N, D]`; returns `[1, N, H, Dv]`."""
    bounds = kwargs.pop(SEQUENCE_BOUNDS, None)
    prefixes = kwargs.pop(SEQUENCE_PREFIXES, None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != bounds[-1] or key.shape[2] != bounds[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    width = flash_value_width(query.shape[-1], value.shape[-1], query.device.type)
    return sequence_attention(module, query, key, value, bounds, width, *args, prefixes=prefixes, **kwargs), None


def _sequence_rows(rows: torch.Tensor, bounds: tuple[int, ...]) -> list[torch.Tensor]:
    """Each sequence's rows `[1, H, stop - start, D]` of a packed tensor, as the pieces of one `split`.

    One split's backward writes every piece's gradient into one full-size tensor once. A slice per sequence would
    cost a zero-filled full-size gradient per sequence and an add of each into the next: on the H200 box
    (`benchmarks/packed_pass.py --layers 4`, a 13,215-token packed row of 16 sequences, 2026-11-30) those fills and
    adds of `[1, 16, N, 192]` took ~15 ms of a 240 ms 4-layer step, about flash's forward and backward together."""
    return list(rows.split([stop - start for start, stop in zip(bounds, bounds[1:])], dim=2))


def _prefix_rows(pieces: list[torch.Tensor], rows: torch.Tensor, bounds: tuple[int, ...],
                 prefix: tuple[int, int]) -> torch.Tensor:
    """The rows `[a, b)` of a sequence's prefix: a view of the one sequence piece that holds them (a chosen
    sequence's prompt), else (a prefix across sequences) a slice of the whole tensor."""
    a, b = prefix
    for index, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        if start <= a and b <= stop:
            return pieces[index][:, :, a - start:b - start]
    return rows[:, :, a:b]


def sequence_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       bounds: tuple[int, ...], width: int, *args: Any,
                       prefixes: tuple[tuple[int, int], ...] | None = None, **kwargs: Any) -> torch.Tensor:
    """`per_sequence_sdpa`'s computation with `value` zero-padded to `width` for the kernels (`flash_value_width`) and
    the output cut back to v's own width: `[1, N, H, Dv]`.

    A sequence with a prefix `(a, b)` in `prefixes` runs causal on its prefix's rows followed by its own (q, k and v
    alike: a square causal call, the kernels' own masking) and keeps its own rows' outputs: each of its tokens sees
    the prefix and its own earlier tokens, as if the prefix were the start of the sequence. The prefix's query rows
    are computed and dropped (a small part of a step: attention against the experts and projections)."""
    value_dim = value.shape[-1]
    if width > value_dim:
        value = nn.functional.pad(value, (0, width - value_dim))
    prefixes = prefixes or ((0, 0),) * (len(bounds) - 1)
    tensors = (query, key, value)
    own = [_sequence_rows(rows, bounds) for rows in tensors]  # per tensor, per sequence
    pieces = []
    with sdpa_kernel(PACKED_BACKENDS):
        for index, (start, stop, prefix) in enumerate(zip(bounds, bounds[1:], prefixes)):
            if stop == start:
                continue
            q, k, v = (
                torch.cat([_prefix_rows(parts, rows, bounds, prefix), parts[index]], dim=2)
                if prefix[1] > prefix[0] else parts[index]
                for rows, parts in zip(tensors, own)
            )
            out = sdpa_attention_forward(module, q, k, v, None, *args, **kwargs)[0]  # [1, prefix + own, H, width]
            pieces.append(out[:, out.shape[1] - (stop - start):])
    out = torch.cat(pieces, dim=1)
    return out[..., :value_dim] if width > value_dim else out


def use_per_sequence_sdpa() -> None:
    """Make transformers' "sdpa" attention `per_sequence_sdpa` in this process (idempotent; calls without
    `SEQUENCE_BOUNDS` behave as before)."""
    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not per_sequence_sdpa:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = per_sequence_sdpa
