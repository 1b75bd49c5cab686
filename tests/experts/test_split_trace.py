"""Timings of split passes (benchmarks): recorded only inside `traced_split()`, cut into passes, summarised as the
cost model's terms."""
from __future__ import annotations

import pytest
import torch

from kllama.experts import ExpertPlacement, HostExperts
from kllama.experts.split_pass import cpu_side
from kllama.experts.split_trace import SplitTiming, passes, record, summarize, traced_split, tracing


def timing(layer: int, start: float, cpu_ms: float, experts: int = 10) -> SplitTiming:
    # a layer staged at `start` ms: the worker starts 0.3 ms later, computes `cpu_ms`, the main thread has it 0.1 later
    s = start / 1e3
    return SplitTiming(f"model.layers.{layer}.mlp.experts", experts, 1920, s, s + 3e-4, s + 3e-4 + cpu_ms / 1e3,
                       s + 4e-4 + cpu_ms / 1e3)


def test_summary_gives_the_models_terms_per_pass() -> None:
    # two passes of three layers staged at 0, 30, 50 ms (and 100 ms later), the CPU side 25 ms on a pass's first
    # layer and 15 ms on the others: 2.5 and 1.5 ms an expert; each worker starts 0.3 ms after its staging, so the
    # gap from one worker's end to the next one's start is 30.3 - 25.3 = 50.3 - 45.3 = 5 ms; cycles 30 and 20 ms
    one = [timing(1, 0.0, 25.0), timing(2, 30.0, 15.0), timing(3, 50.0, 15.0)]
    two = [timing(1, 100.0, 25.0), timing(2, 130.0, 15.0), timing(3, 150.0, 15.0)]
    assert passes(one + two) == [one, two]
    got = summarize(one + two)
    assert got["passes"] == 2 and got["layers"] == 6
    assert got["cpu_ms_per_expert"] == pytest.approx(1.5)
    assert got["first_layer_cpu_ms_per_expert"] == pytest.approx(2.5)
    assert got["gap_ms"] == pytest.approx(5.0)
    assert got["worker_start_ms"] == pytest.approx(0.3)
    assert got["cycle_ms"] == pytest.approx(25.0)  # the median of 30, 20, 30, 20
    assert summarize([])["cpu_ms_per_expert"] is None


def test_timings_are_kept_only_inside_a_traced_block() -> None:
    assert not tracing()
    record(timing(1, 0.0, 1.0))  # dropped
    with traced_split() as outer:
        assert tracing()
        record(timing(1, 0.0, 1.0))
        with traced_split() as inner:
            record(timing(2, 1.0, 1.0))
        record(timing(3, 2.0, 1.0))
    assert not tracing()
    assert [t.layer for t in outer] == ["model.layers.1.mlp.experts", "model.layers.3.mlp.experts"]
    assert [t.layer for t in inner] == ["model.layers.2.mlp.experts"]


def test_the_worker_clocks_its_cpu_side() -> None:
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(8, 96, 64, generator=gen), torch.randn(8, 64, 48, generator=gen)
    module = HostExperts(gate_up, down, torch.nn.SiLU(), ExpertPlacement.from_mode("cpu", cpu_threads=1),
                         "model.layers.0.mlp.experts", compute_device="cpu")
    x = torch.randn(20, 64, generator=gen)
    index, weights = torch.rand(20, 8, generator=gen).topk(2, dim=-1).indices, torch.rand(20, 2, generator=gen)
    clock: list[float] = []
    tokens, rows = cpu_side(None, (x, index, weights), 3, module, {}, 1, False, clock=clock)
    assert len(clock) == 2 and clock[0] <= clock[1]
    assert rows.shape[0] == tokens.numel() == int((index < 3).sum())
