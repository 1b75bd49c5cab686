"""Wall-clock timings of split passes, for benchmarks: what the CPU side of each layer cost and how long the serial
path between two layers' CPU sides took, to check the cost model's constants (`cpu_share.CPU_SLOWDOWN`,
`cpu_share.HOST_GAP_S`) on a machine without a profiler.

Off unless a `traced_split()` block is open (then `SplitExecutor` records one `SplitTiming` a layer, a few
`perf_counter` calls). Both threads read the same clock, so the gap from one layer's worker end to the next layer's
worker start is measured directly.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

_TIMINGS: list["SplitTiming"] | None = None


@dataclass(frozen=True)
class SplitTiming:
    """One layer of a split pass (`time.perf_counter` seconds)."""

    layer: str
    experts: int  # experts the CPU computed
    rows: int  # (token, slot) rows the CPU computed
    staged: float  # the main thread began queuing the copy of the layer's inputs to the host, then submitted
    cpu_start: float  # the worker began computing (its inputs had landed)
    cpu_end: float  # the worker finished
    resumed: float  # the main thread had the result


@contextmanager
def traced_split() -> Iterator[list[SplitTiming]]:
    """Record every split layer run inside the block into the list it yields (blocks nest; the inner one records)."""
    global _TIMINGS
    previous, _TIMINGS = _TIMINGS, []
    try:
        yield _TIMINGS
    finally:
        _TIMINGS = previous


def tracing() -> bool:
    """Whether a `traced_split()` block is open."""
    return _TIMINGS is not None


def record(timing: SplitTiming) -> None:
    """Keep `timing` in the open block's list (nothing outside one)."""
    if _TIMINGS is not None:
        _TIMINGS.append(timing)


def passes(timings: Sequence[SplitTiming]) -> list[list[SplitTiming]]:
    """`timings` cut into passes: a pass ends where a layer comes again."""
    out: list[list[SplitTiming]] = []
    for timing in timings:
        if not out or any(t.layer == timing.layer for t in out[-1]):
            out.append([])
        out[-1].append(timing)
    return out


def _median_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1e3 if values else None


def summarize(timings: Sequence[SplitTiming]) -> dict[str, float | int | None]:
    """Medians over `timings` in ms: the CPU side's time an expert on a pass's later layers and on its first layer,
    the gap from a layer's worker end to the next layer's worker start (the model's `gap`), the worker's start after
    the staging began (the hidden states' copy to the host and the thread's wake-up), and the cycle from one layer's
    staging to the next."""
    cut = passes(timings)
    later = [t for p in cut for t in p[1:]]
    pairs = [(a, b) for p in cut for a, b in zip(p, p[1:])]
    return {
        "passes": len(cut),
        "layers": len(timings),
        "cpu_ms_per_expert": _median_ms([(t.cpu_end - t.cpu_start) / t.experts for t in later]),
        "first_layer_cpu_ms_per_expert": _median_ms([(p[0].cpu_end - p[0].cpu_start) / p[0].experts for p in cut]),
        "gap_ms": _median_ms([b.cpu_start - a.cpu_end for a, b in pairs]),
        "worker_start_ms": _median_ms([t.cpu_start - t.staged for t in timings]),
        "cycle_ms": _median_ms([b.staged - a.staged for a, b in pairs]),
    }
