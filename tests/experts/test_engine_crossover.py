"""Crossover measurement: the pure arithmetic, the CPU timing probe, and the no-CUDA answer."""
from __future__ import annotations

import time

import pytest
import torch

from kllama.experts.crossover import NEVER, cpu_pass_seconds, crossover_from_timings, fit_line, measure_crossover


def test_crossover_is_where_cpu_time_reaches_copy_time() -> None:
    # cpu(T) = 2 ms + 1.35 ms * T, copy = 20.4 ms  ->  T = ceil(18.4 / 1.35) = 14
    assert crossover_from_timings(0.002, 0.00135, 0.0204) == 14
    assert crossover_from_timings(0.05, 0.001, 0.02) == 1  # CPU slower even for one token
    assert crossover_from_timings(0.0, 0.0, 0.02) == NEVER


def test_fit_line_recovers_slope_and_intercept() -> None:
    intercept, slope = fit_line([16.0, 64.0, 256.0], [0.01 + 0.002 * t for t in (16, 64, 256)])
    assert intercept == pytest.approx(0.01)
    assert slope == pytest.approx(0.002)


def test_cpu_pass_probe_runs_forward_and_backward() -> None:
    # timings on a shared 2-core box are too noisy to compare sizes; check the probe runs and reports a duration
    gate_up = torch.full((8, 256, 128), 0.01, dtype=torch.bfloat16)
    down = torch.full((8, 128, 128), 0.01, dtype=torch.bfloat16)
    for backward in (False, True):
        seconds = cpu_pass_seconds(64, gate_up, down, 2, backward=backward)
        assert 0 < seconds < 60


def test_without_cuda_streaming_never_wins() -> None:
    start = time.perf_counter()
    assert measure_crossover(64, 32, 8, 2, torch.float32, "cpu") == NEVER
    assert time.perf_counter() - start < 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_crossover_on_gpu_is_cheap_and_finite() -> None:
    start = time.perf_counter()
    tokens = measure_crossover(2048, 1408, 64, 6, torch.bfloat16, "cuda")
    elapsed = time.perf_counter() - start
    print(f"crossover {tokens} tokens, measured in {elapsed:.2f} s")
    assert 1 <= tokens < NEVER
    assert elapsed < 3.0
