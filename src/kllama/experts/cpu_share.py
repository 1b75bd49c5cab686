"""How many of a streamed layer's experts the CPU computes in a long no-grad pass: the cost model of the split.

A long no-grad pass (a prefill) under `auto` streams every MoE layer: its time is the copy of the layer's experts
over PCIe, the GPU's compute hiding behind it. If the CPU computes the layer's experts `[0, k)` while the copy
engine brings `[k, E)`, a layer costs about `max(cpu(k), copy(E - k))` (if the two sides overlap: see
`CPU_OVERLAPS_COPY`, measured not to yet; else their sum), where

* `copy(n) = n / E * copy_s`: the measured copy of a whole layer (as stored: quantized bytes for int8/fp8),
* `cpu(k) = k * expert_s(rows) + hop`: `expert_s(rows)` the measured seconds of the engine's no-grad CPU pass per
  expert when each gets `rows = T * top_k / E` rows (interpolated between start-up samples), `hop` the device->host
  copy of the pass's hidden states and the host->device copy of the CPU's rows, at the measured copy bandwidth.

`k` is the value minimising that maximum; 0 when the best split does not save at least `MIN_GAIN` of the streamed
layer (short passes, slow CPU paths such as quantized weights through the torch loop: the same model decides, no
scheme is special-cased). Contiguous `[0, k)` because the copy of layer i+1 is queued before its routing is known:
only a fixed block can be left out of it (docs/design.md, "Long no-grad passes split their experts").
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from kllama.experts.crossover import Crossovers, running_max

MIN_GAIN = 0.05  # a split must save this share of a streamed layer's time (below it: noise in the estimates)
# Whether the CPU side runs while the copy engine brings the rest. Measured on the H200 box (2026-11-30, V2-Lite,
# 2,048-token prefill, `benchmarks/decode.py --cpu-experts 0,8,13,16`): 0.525 / 0.711 / 0.998 / 1.136 s, i.e. the
# CPU's k experts and the copy of the other 64 - k ran one after the other (k = 8: 26 x (8 x 1.19 + 56 x 0.317) ms
# = 0.71 s), not at once. Until that overlap is made to happen and measured, the model adds the two sides, which
# never pays for a CPU slower per expert than the copy: long passes stream everything (`forced_split` still splits).
CPU_OVERLAPS_COPY = False


@dataclass(frozen=True)
class SplitPlan:
    """The split of one pass: the CPU takes `cpu_experts` of `num_experts`; estimated seconds a layer."""

    cpu_experts: int
    num_experts: int
    num_tokens: int
    layer_s: float  # estimated with the split
    stream_s: float  # estimated streaming all experts


def per_expert_seconds(samples: Sequence[tuple[int, float]], rows: float) -> float:
    """CPU seconds per expert at `rows` rows each, from `(rows, seconds)` samples: interpolated on their running
    maximum, the smallest sample's time below it (reading an expert's weights is a floor), the last slope above."""
    points = running_max(samples)
    if not points:
        return float("inf")
    if rows <= points[0][0] or len(points) == 1:
        return points[0][1] if rows <= points[0][0] else points[0][1] * rows / points[0][0]
    for (r0, s0), (r1, s1) in zip(points, points[1:]):
        if rows <= r1:
            return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)
    (r0, s0), (r1, s1) = points[-2], points[-1]
    return s1 + (s1 - s0) / (r1 - r0) * (rows - r1)


@dataclass(frozen=True)
class SplitModel:
    """Measured numbers of one layer shape on this machine, and the split they give a pass of a given length."""

    num_experts: int
    top_k: int
    copy_s: float  # one whole layer, host -> GPU, as stored
    copy_bandwidth: float  # bytes/s of that copy
    token_bytes: int  # one token's hidden state in the compute dtype (hidden * itemsize)
    expert_samples: tuple[tuple[int, float], ...]  # (rows per expert, CPU seconds per expert)
    overlapped: bool = CPU_OVERLAPS_COPY  # the CPU side runs during the copy (max of the two) or before it (sum)

    @classmethod
    def from_crossovers(cls, found: Crossovers, num_experts: int, top_k: int, token_bytes: int,
                        ) -> "SplitModel | None":
        """The model of a layer shape from its start-up measurement (None when nothing was measured: no CUDA)."""
        if not found.expert_samples or found.copy_s <= 0 or found.copy_bandwidth <= 0:
            return None
        return cls(num_experts, top_k, found.copy_s, found.copy_bandwidth, token_bytes, found.expert_samples)

    def cpu_terms(self, num_tokens: int) -> tuple[float, float]:
        """`(seconds per expert, hop seconds)` of the CPU side of a pass over `num_tokens` tokens."""
        rows = num_tokens * self.top_k / self.num_experts
        hop = 2 * num_tokens * self.token_bytes / self.copy_bandwidth
        return per_expert_seconds(self.expert_samples, rows), hop

    def cpu_seconds(self, experts: int, num_tokens: int) -> float:
        """Estimated CPU side of a pass over `num_tokens` tokens computing `experts` experts (0 for none)."""
        if experts <= 0:
            return 0.0
        per_expert, hop = self.cpu_terms(num_tokens)
        return experts * per_expert + hop

    def copy_seconds(self, experts: int) -> float:
        """The copy of `experts` of the layer's experts."""
        return self.copy_s * experts / self.num_experts

    def layer_seconds(self, cpu_experts: int, num_tokens: int) -> float:
        """Estimated layer time with the CPU taking `cpu_experts` (the GPU's compute hidden behind the copy)."""
        cpu, copy = self.cpu_seconds(cpu_experts, num_tokens), self.copy_seconds(self.num_experts - cpu_experts)
        return max(cpu, copy) if self.overlapped else cpu + copy

    @functools.lru_cache(maxsize=64)  # noqa: B019 (frozen, hashable, few instances; asked per layer and pass)
    def plan(self, num_tokens: int) -> SplitPlan:
        """The split of a no-grad pass over `num_tokens` tokens: the k minimising `layer_seconds`, or 0 when it does
        not save `MIN_GAIN` of streaming everything."""
        stream_s = self.copy_seconds(self.num_experts)
        per_expert, hop = self.cpu_terms(num_tokens)  # layer_seconds' terms, computed once for the 65 candidates

        def layer_s(k: int) -> float:
            cpu, copy = k * per_expert + hop if k else 0.0, self.copy_seconds(self.num_experts - k)
            return max(cpu, copy) if self.overlapped else cpu + copy

        best = min(range(self.num_experts + 1), key=lambda k: (layer_s(k), k))
        best_s = layer_s(best)
        if best_s > (1 - MIN_GAIN) * stream_s:
            best, best_s = 0, stream_s
        return SplitPlan(best, self.num_experts, num_tokens, best_s, stream_s)

    def describe(self, num_tokens: int) -> str:
        """One line for the start-up report: what a long no-grad pass of `num_tokens` tokens does."""
        p = self.plan(num_tokens)
        if p.cpu_experts == 0:
            return (f"long no-grad passes: all {p.num_experts} experts a layer streamed at {num_tokens:,} tokens "
                    f"(est. {p.stream_s * 1e3:.1f} ms a layer; a CPU share would not be faster)")
        return (f"long no-grad passes: CPU takes {p.cpu_experts} of {p.num_experts} experts a layer at "
                f"{num_tokens:,} tokens (est. {p.layer_s * 1e3:.1f} ms a layer vs {p.stream_s * 1e3:.1f} ms "
                f"streaming all)")
