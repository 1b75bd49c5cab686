"""How many of a streamed layer's experts the CPU computes in a long no-grad pass: the cost model of the split.

A long no-grad pass (a prefill) under `auto` streams every MoE layer: its time is the copy of the layer's experts
over PCIe, the GPU's compute hiding behind it. If the CPU computes the layer's experts `[0, k)` while the copy
engine brings `[k, E)`, a layer costs `max(copy(E - k), cpu(k))` (the two sides overlap: `CPU_OVERLAPS_COPY`), where

* `copy(n) = n / E * copy_s`: the measured copy of a whole layer (as stored: quantized bytes for int8/fp8),
* `cpu(k) = k * CPU_SLOWDOWN * expert_s(rows) + gap`: `expert_s(rows)` the seconds per expert of the split pass's
  CPU side measured at start-up in its worker thread with its thread count, when each expert gets `rows = T *
  top_k / E` rows (interpolated between samples); `gap` the serial host path between one layer's CPU side and the
  next one's (`HOST_GAP_S`) plus the device->host copy of the hidden states and the host->device copy of the CPU's
  rows at the measured copy bandwidth.

`k` is the value minimising that maximum among those whose CPU side fits under the copy of the rest, so a layer
costs `copy(E - k)` and some jitter of the CPU side (a pass's cold first layer) is absorbed by the copy instead of
setting the pace (the unconstrained optimum is that k or the one above it); 0 when it does not save at least
`MIN_GAIN` of the streamed layer (short passes, slow CPU paths such as quantized weights through the torch loop: the
same model decides, no scheme is special-cased). Contiguous `[0, k)` because the copy of layer i+1 is queued before
its routing is known: only a fixed block can be left out of it (docs/design.md, "Long no-grad passes split their
experts").
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from kllama.experts.crossover import Crossovers, running_max

# A split must save this share of a streamed layer's time. On the H200 box (2026-11-30, V2-Lite bf16, 2,048-token
# prefill, streaming all: 0.526-0.529 s) the split's measured gain was within its run-to-run spread: k = 6 took
# 0.498 / 0.505 s in one run, 0.533 s forced in the same run, and 0.615 / 0.640 s in an earlier one (forced: 0.513),
# while k >= 8 lost badly (0.71-1.8 s: the CPU side slows with k). Below 10 % a predicted gain is not worth that
# risk; the split is for machines whose copy is slow against their CPU (e.g. PCIe 4: ~0.7 ms an expert -> k ~ 11).
MIN_GAIN = 0.10
# Whether the CPU side runs while the copy engine brings the rest. It does: torch.profiler on the H200 box
# (2026-11-30, 8 full-size V2-Lite layers, 2,048-token prefill, bf16, k = 10) shows layer i+1's weight copy (54
# experts, 16.9 ms) running while the worker computes layer i's 10 experts. An earlier sweep (k = 8: 0.711 s
# against 0.525 s streaming all) had read as the two sides running one after the other; the profile shows instead
# a cycle of max(copy, cpu + gap) with a CPU side slower than sampled (CPU_SLOWDOWN) and a serial host gap
# (HOST_GAP_S). False: the model adds the two sides (never splits while the CPU is slower per expert than the copy).
CPU_OVERLAPS_COPY = True
# The serial host path from one layer's CPU side ending to the next layer's starting: the main thread wakes from the
# worker's result, queues the rows' copy and `index_add_`, launches the next attention (~30 small kernels the GPU
# runs at host launch speed), the router, the staging copies and the submit. torch.profiler on the H200 box
# (2026-11-30) showed ~3.7 ms; the split trace of `benchmarks/decode.py` after the submit moved ahead of the acquire
# measured 3.95 / 4.36 / 4.56 / 5.19 ms (k = 8 / 10 / 6 / the model's 6): most of it is the attention's launches.
HOST_GAP_S = 4.5e-3
# The CPU side's seconds per expert in a real pass against the start-up sample (taken in the worker thread, 192 rows:
# 1.79 ms on the H200 box, 2026-11-30). The split trace of the same run measured 2.20 and 2.66 ms with k = 6 (1.23x,
# 1.48x), 2.97 ms with k = 8 (1.66x) and 4.57 ms with k = 10 (2.55x): the copy engine reads host DRAM meanwhile and
# the worker shares the GIL with the main thread's launches, and the slowdown grows with k. 1.5 keeps the model's k
# where it was measured (k = 5-6 on that box); a larger k would set the pace with a CPU side slower than modelled.
CPU_SLOWDOWN = 1.5


def useful_expert_seconds(copy_s: float, num_experts: int) -> float:
    """The CPU seconds per expert (as sampled at start-up) above which `SplitModel.plan` gives the CPU no expert at
    any pass length: a split must save `MIN_GAIN` of the streamed layer, so the CPU takes k >= MIN_GAIN * E experts,
    and their side, k * CPU_SLOWDOWN * seconds per expert (+ the gap), must fit in the (1 - MIN_GAIN) of the copy
    left. The start-up sampling stops at the first row count above it (more rows never cost less per expert)."""
    return (1 - MIN_GAIN) * copy_s / (MIN_GAIN * num_experts * CPU_SLOWDOWN)


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
    host_gap_s: float = HOST_GAP_S  # the serial host path between two layers' CPU sides
    cpu_slowdown: float = CPU_SLOWDOWN  # a real pass's CPU seconds per expert over the start-up sample

    @classmethod
    def from_crossovers(cls, found: Crossovers, num_experts: int, top_k: int, token_bytes: int,
                        ) -> "SplitModel | None":
        """The model of a layer shape from its start-up measurement (None when nothing was measured: no CUDA)."""
        if not found.expert_samples or found.copy_s <= 0 or found.copy_bandwidth <= 0:
            return None
        return cls(num_experts, top_k, found.copy_s, found.copy_bandwidth, token_bytes, found.expert_samples)

    def cpu_terms(self, num_tokens: int) -> tuple[float, float]:
        """`(seconds per expert, gap seconds)` of the CPU side of a pass over `num_tokens` tokens: the sampled time
        times the slowdown, and the host gap plus the hidden states' and rows' copies."""
        rows = num_tokens * self.top_k / self.num_experts
        hop = 2 * num_tokens * self.token_bytes / self.copy_bandwidth
        return self.cpu_slowdown * per_expert_seconds(self.expert_samples, rows), self.host_gap_s + hop

    def cpu_seconds(self, experts: int, num_tokens: int) -> float:
        """Estimated CPU side (with its gap) of a pass over `num_tokens` tokens computing `experts` experts (0 for
        none)."""
        if experts <= 0:
            return 0.0
        per_expert, gap = self.cpu_terms(num_tokens)
        return experts * per_expert + gap

    def copy_seconds(self, experts: int) -> float:
        """The copy of `experts` of the layer's experts."""
        return self.copy_s * experts / self.num_experts

    def layer_seconds(self, cpu_experts: int, num_tokens: int) -> float:
        """Estimated layer time with the CPU taking `cpu_experts` (the GPU's compute hidden behind the copy)."""
        cpu, copy = self.cpu_seconds(cpu_experts, num_tokens), self.copy_seconds(self.num_experts - cpu_experts)
        return max(cpu, copy) if self.overlapped else cpu + copy

    @functools.lru_cache(maxsize=64)  # noqa: B019 (frozen, hashable, few instances; asked per layer and pass)
    def plan(self, num_tokens: int) -> SplitPlan:
        """The split of a no-grad pass over `num_tokens` tokens: the k minimising `layer_seconds` among those whose
        CPU side fits under their copy (overlapped), or 0 when it does not save `MIN_GAIN` of streaming everything."""
        stream_s = self.copy_seconds(self.num_experts)
        per_expert, gap = self.cpu_terms(num_tokens)  # layer_seconds' terms, computed once for the 65 candidates

        def sides(k: int) -> tuple[float, float]:
            return (k * per_expert + gap if k else 0.0), self.copy_seconds(self.num_experts - k)

        def layer_s(k: int) -> float:
            cpu, copy = sides(k)
            return max(cpu, copy) if self.overlapped else cpu + copy

        fits = [k for k in range(self.num_experts + 1) if not self.overlapped or sides(k)[0] <= sides(k)[1]]
        best = min(fits, key=lambda k: (layer_s(k), k))
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
