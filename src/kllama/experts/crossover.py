"""Measure, on this machine, the token count above which streaming a layer's experts to the GPU beats the CPU.

A streamed pass costs one layer copy (bytes / pinned host->GPU bandwidth) whatever the token count; a CPU pass costs
roughly `fixed + per_token * T`. The GPU compute of a streamed pass is tiny next to the copy (DESIGN.md: 13 ms for 16k
tokens vs 20 ms copy) and is ignored. Both sides are timed with the layer's real shapes in well under 2 s.
"""
from __future__ import annotations

import math
import time

import torch

from kllama.experts.cpu_compute import intra_op_threads
from kllama.experts.pinned import host_empty
from kllama.experts.routed import experts_backward, experts_forward, route

NEVER = 1 << 62  # "always use the CPU" (no CUDA device, or the CPU is faster at any size)
_COPY_PROBE_BYTES = 256 << 20


def crossover_from_timings(cpu_fixed_s: float, cpu_per_token_s: float, copy_s: float) -> int:
    """Smallest token count T with `copy_s <= cpu_fixed_s + cpu_per_token_s * T` (at least 1; NEVER if none)."""
    if cpu_per_token_s <= 0:
        return NEVER
    return max(1, math.ceil((copy_s - cpu_fixed_s) / cpu_per_token_s))


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares `(intercept, slope)` of ys against xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def cpu_pass_seconds(num_tokens: int, gate_up: torch.Tensor, down: torch.Tensor, top_k: int, backward: bool) -> float:
    """Wall time of one CPU routed-experts pass as the engine runs it (forward, plus the backward from the saved
    pre-activations when `backward`) over random routing of `num_tokens` tokens."""
    num_experts, _, hidden = gate_up.shape
    silu = torch.nn.functional.silu
    x = torch.randn(num_tokens, hidden, dtype=gate_up.dtype)
    index = torch.rand(num_tokens, num_experts).topk(top_k, dim=-1).indices  # [T, K] distinct experts per token
    weights = torch.rand(num_tokens, top_k)
    start = time.perf_counter()
    with torch.no_grad():
        routing = route(index, num_experts)
        out, saved = experts_forward(x, routing, weights, gate_up, down, silu)
    if backward:
        experts_backward(x, routing, weights, saved, gate_up, down, silu, (), (), torch.ones_like(out), [True, True])
    return time.perf_counter() - start


def copy_seconds(layer_bytes: int, device: torch.device) -> float:
    """Time to copy `layer_bytes` from pinned host memory to `device`, from a probe of at most 256 MiB."""
    probe = min(layer_bytes, _COPY_PROBE_BYTES)
    host = host_empty(probe, torch.uint8, pin=True)  # not torch's pin_memory(): its cache would keep it pinned
    dev = torch.empty(probe, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 3
    return seconds * layer_bytes / probe


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
    samples: tuple[int, ...] = (16, 64, 256),
) -> int:
    """Token count per pass above which `stream` beats `cpu` for one layer of this shape on this machine (fwd+bwd
    when `backward`). Returns NEVER when `device` is not CUDA (streaming is impossible there)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return NEVER
    element = torch.empty((), dtype=dtype).element_size()
    copy_s = copy_seconds(3 * num_experts * hidden * inter * element, device)
    # weight values do not change GEMM time; a constant fill is much faster than random init at full size
    gate_up = torch.full((num_experts, 2 * inter, hidden), 0.01, dtype=dtype)
    down = torch.full((num_experts, hidden, inter), 0.01, dtype=dtype)
    with intra_op_threads(cpu_threads):
        cpu_pass_seconds(samples[0], gate_up, down, top_k, backward)  # warm-up
        times = [cpu_pass_seconds(t, gate_up, down, top_k, backward) for t in samples]
    fixed, per_token = fit_line([float(t) for t in samples], times)
    return crossover_from_timings(fixed, per_token, copy_s)
