"""Measure, on this machine, the token count per pass above which streaming a layer's experts to the GPU beats the CPU,
once for each pass kind.

Two pass kinds, because they pay for different things:
* `inference` (no gradient: decode, prefill, a DPO reference pass): one CPU forward against one layer copy.
* `training` (a forward whose backward follows): CPU forward + backward against two copies (the forward's, and the
  backward's: the checkpoint recompute and the backward share one).

Physics bounds the answer. A streamed pass costs at least the layer's bytes over the measured pinned copy bandwidth
(its GPU compute is ignored: 13 ms for 16k tokens against a 20 ms copy, docs/design.md). A 1-token pass never streams
where a CPU path exists: it reads K of E experts from host RAM instead of all E over PCIe, so every crossover is
>= 2. The CPU side is timed with the engine's own pass at doubling token counts (warm-up, median of repeats) until it
costs more than the stream floor, and the crossover is interpolated between the last two counts, on the running
maximum of the timings (a pass over more tokens never costs less). Quantized experts (`scheme` int8 / fp8) are
measured as they run: the copy moves their bytes, the CPU no-grad pass reads them, a CPU training pass dequantizes
the layer first.

Next to the inference crossover, the CPU's seconds per expert are sampled at a few row counts (`expert_samples`),
in the split pass's worker thread with its thread count: the cost model of long no-grad passes that leave some
experts to the CPU (`kllama.experts.cpu_share`) reads them. The sampling stops at the first row count where that
model could no longer give the CPU any expert (more samples could not change a plan).

Start-up cost: the passes run on the layer's own host weights and the copy is probed from their pinned bytes, so
nothing full-size is built or pinned for the measurement; each piece is timed (`Crossovers.phases`) and the load
prints one line (`measurement_note`). The CPU kernel's load is its own piece: its one-time build (~14 s on the H200
box) used to land unseen in the first sample. On that box a V2-Lite layer's samples sum to ~0.2 s; each is timed
four times (warm-up, three repeats) and the split's over 8 experts a call, ~1.2 s of passes in all.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from kllama.experts.cpu_compute import cpu_infer_forward, intra_op_threads, kernel_operands, worker_threads
from kllama.experts.cpu_kernels import KERNEL_DTYPES, kernel_status
from kllama.experts.split_pass import cpu_share_rows, run_on_worker
from kllama.experts.pinned import host_empty
from kllama.experts.quant import ExpertWeight, QuantizedWeight, constant_quantized, dequantize, weight_nbytes
from kllama.experts.routed import experts_backward, experts_forward, route

NEVER = 1 << 62  # "always use the CPU" (no CUDA device, or the CPU is faster at any size)
MIN_CROSSOVER = 2  # a 1-token pass never streams
PASS_KINDS: tuple[str, ...] = ("inference", "training")
COPIES_PER_PASS: dict[str, int] = {"inference": 1, "training": 2}
_COPY_PROBE_BYTES = 256 << 20
# Rows per expert at which the CPU's per-expert time is sampled (a 2,048-token V2-Lite prefill routes ~192 to each)
EXPERT_ROWS: tuple[int, ...] = (32, 64, 128, 192, 256, 512)
_EXPERTS_PER_SAMPLE = 8


@dataclass(frozen=True)
class Crossovers:
    """Measured crossovers of one layer shape, per pass kind, with the timings they came from (for estimates)."""

    inference: int
    training: int
    copy_s: float = 0.0  # one layer copy, host -> GPU
    samples: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # kind -> [(tokens, CPU seconds)]
    copy_bandwidth: float = 0.0  # bytes/s of the pinned host -> GPU copy
    expert_samples: tuple[tuple[int, float], ...] = ()  # (rows per expert, CPU no-grad seconds per expert)
    phases: tuple[tuple[str, float], ...] = ()  # (piece of the measurement, wall seconds), in the order they ran

    def stream_seconds(self, kind: str) -> float:
        """Lower bound of one streamed pass of `kind` (its copies)."""
        return COPIES_PER_PASS[kind] * self.copy_s

    def cpu_seconds(self, kind: str, tokens: int) -> float:
        """Estimated CPU pass time of `kind` over `tokens` tokens (interpolated, extrapolated with the last slope)."""
        return interpolate(self.samples.get(kind, []), tokens)


def running_max(samples: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """`samples` sorted by token count with each time raised to the largest seen so far (more tokens never cost
    less; a smaller later timing is noise)."""
    out: list[tuple[int, float]] = []
    for tokens, seconds in sorted(samples):
        out.append((tokens, max(seconds, out[-1][1]) if out else seconds))
    return out


def interpolate(samples: Sequence[tuple[int, float]], tokens: int) -> float:
    """Piecewise-linear value of the (monotone) `samples` at `tokens`; beyond the last sample, the last slope."""
    points = running_max(samples)
    if not points:
        return 0.0
    if len(points) == 1 or tokens <= points[0][0]:
        return points[0][1] * (tokens / points[0][0] if tokens < points[0][0] else 1.0)
    for (t0, s0), (t1, s1) in zip(points, points[1:]):
        if tokens <= t1:
            return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
    (t0, s0), (t1, s1) = points[-2], points[-1]
    return s1 + (s1 - s0) / (t1 - t0) * (tokens - t1)


def crossover_from_samples(samples: Sequence[tuple[int, float]], stream_s: float) -> int:
    """Smallest token count whose CPU time reaches `stream_s`, from `(tokens, seconds)` CPU timings: interpolated
    between the two samples around it, extrapolated from the last two when the CPU never got there (NEVER when
    its time does not grow). Never below MIN_CROSSOVER."""
    points = running_max(samples)
    if not points:
        return NEVER
    previous = (0, 0.0)
    for tokens, seconds in points:
        if seconds >= stream_s:
            t0, s0 = previous
            crossing = t0 + (stream_s - s0) / (seconds - s0) * (tokens - t0) if seconds > s0 else tokens
            return max(MIN_CROSSOVER, math.ceil(crossing))
        previous = (tokens, seconds)
    if len(points) < 2:
        return NEVER
    (t0, s0), (t1, s1) = points[-2], points[-1]
    if s1 <= s0:
        return NEVER
    return max(MIN_CROSSOVER, math.ceil(t1 + (stream_s - s1) * (t1 - t0) / (s1 - s0)))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_pass(num_tokens: int, gate_up: ExpertWeight, down: ExpertWeight, top_k: int, kind: str,
             seed: int = 0) -> Callable[[], object]:
    """One CPU routed-experts pass of `kind` as the engine runs it, over random routing of `num_tokens` tokens:
    `inference` is the engine's no-grad CPU pass, `training` the forward that saves the gate/up pre-activations
    plus the backward from them (quantized weights dequantized first, as the CPU training pass does)."""
    num_experts, _, hidden = gate_up.shape
    silu = torch.nn.functional.silu
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(gate_up.dtype)
    index = torch.rand(num_tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices  # [T, K] distinct
    weights = torch.rand(num_tokens, top_k, generator=gen)
    if kind == "inference":
        return lambda: cpu_infer_forward(x, index, weights, gate_up, down, silu)

    def training() -> None:
        dense_gate_up, dense_down = dequantize(gate_up), dequantize(down)
        with torch.no_grad():
            routing = route(index, num_experts)
            out, hidden_pre = experts_forward(x, routing, weights, dense_gate_up, dense_down, silu)
        experts_backward(x, routing, weights, hidden_pre, dense_gate_up, dense_down, silu, (), (),
                         torch.ones_like(out), [True, True])

    return training


def cpu_pass_seconds(num_tokens: int, gate_up: ExpertWeight, down: ExpertWeight, top_k: int, kind: str,
                     repeats: int = 3) -> float:
    """Median wall time of the engine's CPU pass of `kind` over `num_tokens` tokens (after a warm-up)."""
    return median_seconds(cpu_pass(num_tokens, gate_up, down, top_k, kind), repeats)


def cpu_expert_seconds(rows: int, gate_up: ExpertWeight, down: ExpertWeight, repeats: int = 3) -> float:
    """Seconds per expert of the CPU side of a split pass (`split_pass.cpu_share_rows`) when each expert gets `rows`
    rows: median over calls of 8 experts each, a different 8 every call so their weights come from DRAM as in a real
    pass."""
    num_experts, _, hidden = gate_up.shape
    group = min(_EXPERTS_PER_SAMPLE, num_experts)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(group * rows, hidden, generator=gen).to(gate_up.dtype)
    weights = torch.rand(group * rows, 1, generator=gen)
    block = torch.arange(group * rows) // rows  # [group * rows]: rows of expert 0, then 1, ...
    indexes = [((block + start) % num_experts).unsqueeze(1) for start in range(0, num_experts, group)]
    calls = iter(range(1 << 30))
    silu = torch.nn.functional.silu

    def one() -> None:
        cpu_share_rows(x, indexes[next(calls) % len(indexes)], weights, num_experts, gate_up, down, silu)

    return median_seconds(one, repeats) / group


def sample_rows_until(seconds_per_expert: Callable[[int], float], ceiling: float,
                      rows: Sequence[int] = EXPERT_ROWS) -> tuple[tuple[int, float], ...]:
    """`(rows, seconds_per_expert(rows))` at each of `rows` (ascending) up to and including the first above `ceiling`:
    past it the split model never gives the CPU an expert (`cpu_share.useful_expert_seconds`), so more samples could
    not change a plan. On a CPU without fast bf16 GEMMs this skips most of the sampling (a 2-core AVX2 host took
    81 s for the six row counts, 2.2 s for the first)."""
    samples: list[tuple[int, float]] = []
    for count in rows:
        samples.append((count, seconds_per_expert(count)))
        if samples[-1][1] > ceiling:
            break
    return tuple(samples)


def copy_bandwidth(device: torch.device, probe_bytes: int = _COPY_PROBE_BYTES, repeats: int = 5,
                   source: torch.Tensor | None = None) -> float:
    """Pinned host -> `device` copy bandwidth in bytes/s: median of `repeats` timed copies after a warm-up, from
    `source` (pinned host bytes, e.g. `pinned_bytes` of the layer being measured) or a `probe_bytes` buffer pinned for
    the probe (pinning and releasing 256 MiB costs more than the copies)."""
    host = source if source is not None else host_empty(probe_bytes, torch.uint8, pin=True)  # exact-size pinning
    dev = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return host.numel() / statistics.median(times)


def pinned_bytes(weight: ExpertWeight, nbytes: int = _COPY_PROBE_BYTES) -> torch.Tensor | None:
    """The first `nbytes` of `weight`'s stored values as a flat uint8 view when they are contiguous page-locked host
    memory that large (the engine's host weights on a CUDA machine), else None."""
    values = weight.data if isinstance(weight, QuantizedWeight) else weight
    if values.device.type != "cpu" or not values.is_contiguous() or values.numel() * values.itemsize < nbytes:
        return None
    if not values.is_pinned():
        return None
    return values.reshape(-1).view(torch.uint8)[:nbytes]


def probe_layer(hidden: int, inter: int, num_experts: int, dtype: torch.dtype, scheme: str | None = None,
                ) -> tuple[ExpertWeight, ExpertWeight]:
    """A layer's `(gate_up [E, 2I, H], down [E, H, I])` of constant values, held in `dtype` or quantized with `scheme`
    (values do not change a pass's time; a constant fill is much cheaper than random init at full size): for a
    measurement without the layer's own weights."""
    shapes = ((num_experts, 2 * inter, hidden), (num_experts, hidden, inter))
    if scheme is None:
        gate_up, down = (torch.full(shape, 0.01, dtype=dtype) for shape in shapes)
        return gate_up, down
    gate_up, down = (constant_quantized(shape, scheme, dtype, p) for shape, p in zip(shapes, (2, 1)))
    return gate_up, down


class PhaseClock:
    """Wall seconds of the named pieces of one measurement, in the order they ran (`Crossovers.phases`)."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - start))


def measurement_note(measured: Sequence[Crossovers]) -> str | None:
    """One line for the start-up report: how long the crossover measurements took, piece by piece (summed over
    `measured`, one per distinct layer shape), or None when nothing was measured (no CUDA device)."""
    totals: dict[str, float] = {}
    for found in measured:
        for name, seconds in found.phases:
            totals[name] = totals.get(name, 0.0) + seconds
    if not totals:
        return None
    pieces = ", ".join(f"{name} {seconds:.2f}" for name, seconds in totals.items())
    return f"crossovers measured in {sum(totals.values()):.2f} s ({pieces})"


def sample_cpu_until(pass_seconds: Callable[[int], float], stream_s: float, *, max_tokens: int = 4096,
                     budget_s: float = 1.5) -> list[tuple[int, float]]:
    """Time the CPU pass at 1, 2, 4, ... tokens until it costs at least `stream_s`, `max_tokens` is passed, or the
    sampling has used `budget_s` of wall time (the crossover is then extrapolated from the last two samples).

    The budget starts after the first sample, which carries one-time costs (the CPU kernel's first build, first
    page touches): on a fresh H200 box the kernel build took 14 s inside the first sample, the budget was spent
    before a second one, and a single sample below the stream floor gave NEVER, so every 2,048-token prefill ran
    on the CPU (3.0 s instead of 0.52 s). At least two samples are always taken, so a crossover can be
    extrapolated."""
    samples: list[tuple[int, float]] = []
    start, tokens = 0.0, 1
    while tokens <= max_tokens:
        samples.append((tokens, pass_seconds(tokens)))
        if len(samples) == 1:
            start = time.perf_counter()
        if samples[-1][1] >= stream_s or (len(samples) >= 2 and time.perf_counter() - start > budget_s):
            break
        tokens *= 2
    return samples


def measure_crossovers(
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    cpu_threads: int | None = None,
    kinds: Sequence[str] = PASS_KINDS,
    repeats: int = 3,
    scheme: str | None = None,
    split: bool = True,
    weights: tuple[ExpertWeight, ExpertWeight] | None = None,
) -> Crossovers:
    """Crossovers of one layer shape on this machine for each pass kind in `kinds` (NEVER for both when `device`
    is not CUDA: streaming is impossible there), for weights held in `dtype` or quantized with `scheme`; with
    `split`, also the CPU's seconds per expert at `EXPERT_ROWS` (the split model of long no-grad passes).

    `weights` are the layer's own host weights `(gate_up [E, 2I, H], down [E, H, I])` (what the engine loads): the
    passes run on them and the copy is probed from their pinned bytes, so nothing full-size is built for the
    measurement; without them a constant layer of the shape is built (`probe_layer`). `Crossovers.phases` says
    where the time went."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return Crossovers(NEVER, NEVER)
    clock = PhaseClock()
    if weights is None:
        with clock.phase("probe layer"):
            weights = probe_layer(hidden, inter, num_experts, dtype, scheme)
    gate_up, down = weights
    if tuple(gate_up.shape) != (num_experts, 2 * inter, hidden) or tuple(down.shape) != (num_experts, hidden, inter):
        raise ValueError(f"weights {tuple(gate_up.shape)} / {tuple(down.shape)} are not the layer shape "
                         f"E={num_experts}, I={inter}, H={hidden}")
    with clock.phase("copy probe"):
        bandwidth = copy_bandwidth(device, source=pinned_bytes(gate_up))
    return sample_crossovers(gate_up, down, top_k, bandwidth, cpu_threads=cpu_threads, kinds=kinds, repeats=repeats,
                             split=split, clock=clock)


def sample_crossovers(
    gate_up: ExpertWeight,
    down: ExpertWeight,
    top_k: int,
    bandwidth: float,
    *,
    cpu_threads: int | None = None,
    kinds: Sequence[str] = PASS_KINDS,
    repeats: int = 3,
    split: bool = True,
    clock: PhaseClock | None = None,
) -> Crossovers:
    """The CPU side of `measure_crossovers` for host weights `gate_up [E, 2I, H]`, `down [E, H, I]` whose copy to
    the GPU runs at `bandwidth` bytes/s: the CPU kernel loaded (its one-time cost timed on its own), each pass kind
    in `kinds` sampled until it costs more than its stream floor, and with `split` the per-expert samples (up to the
    first row count where the split model could no longer give the CPU an expert)."""
    clock = clock or PhaseClock()
    copy_s = (weight_nbytes(gate_up) + weight_nbytes(down)) / bandwidth
    operands = kernel_operands(gate_up, down)
    if operands is not None and operands[0].dtype in KERNEL_DTYPES:
        with clock.phase("cpu kernel"):  # built or loaded once per process, by the first pass otherwise
            kernel_status()
    expert_samples: tuple[tuple[int, float], ...] = ()
    samples: dict[str, list[tuple[int, float]]] = {}
    result = {kind: NEVER for kind in PASS_KINDS}
    with intra_op_threads(cpu_threads):
        for kind in kinds:
            stream_s = COPIES_PER_PASS[kind] * copy_s
            with clock.phase(kind):
                samples[kind] = sample_cpu_until(
                    lambda t: cpu_pass_seconds(t, gate_up, down, top_k, kind, repeats), stream_s)
            result[kind] = crossover_from_samples(samples[kind], stream_s)
    if split:  # in the split pass's worker thread with its thread count, as its CPU side runs
        from kllama.experts.cpu_share import useful_expert_seconds  # cpu_share reads Crossovers: imported here

        ceiling = useful_expert_seconds(copy_s, gate_up.shape[0])

        def sample() -> tuple[tuple[int, float], ...]:
            with intra_op_threads(worker_threads(cpu_threads)):
                return sample_rows_until(lambda rows: cpu_expert_seconds(rows, gate_up, down, repeats), ceiling)

        with clock.phase("split"):
            expert_samples = run_on_worker(sample)
    return Crossovers(result["inference"], result["training"], copy_s, samples, bandwidth, expert_samples,
                      tuple(clock.phases))


def measure_crossover(
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    backward: bool = True,
    cpu_threads: int | None = None,
) -> int:
    """Token count per pass above which `stream` beats `cpu` for one layer of this shape on this machine: for a
    training pass (forward + backward) when `backward`, else for a no-grad inference pass."""
    kind = "training" if backward else "inference"
    found = measure_crossovers(hidden, inter, num_experts, top_k, dtype, device, cpu_threads=cpu_threads,
                               kinds=(kind,), split=False)
    return found.training if backward else found.inference
