"""benchmarks/decode.py's `--timeline`: a token's time split from the hand-off thread's (go seen, done) stamps."""
from __future__ import annotations

from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def decode(benchmark_script) -> ModuleType:  # noqa: ANN001
    return benchmark_script("decode")


def _stamps(tokens: int, layers: int, cpu_ns: int, between_ns: int, edge_ns: int) -> list[tuple[int, int]]:
    stamps, t = [], 1_000
    for _ in range(tokens):
        for layer in range(layers):
            stamps.append((t, t + cpu_ns))
            t += cpu_ns + (between_ns if layer < layers - 1 else edge_ns)
    return stamps


def test_a_regular_timeline_splits_into_its_parts(decode: ModuleType) -> None:
    found = decode.timeline_split(_stamps(5, 4, cpu_ns=500_000, between_ns=120_000, edge_ns=900_000), steps=5)
    assert found == pytest.approx({"layers": 4, "cpu_ms_per_token": 2.0, "between_passes_ms_per_token": 0.36,
                                   "between_passes_us_per_gap": 120.0, "between_tokens_ms": 0.9})


def test_the_parts_are_medians_over_tokens(decode: ModuleType) -> None:
    stamps = _stamps(3, 2, cpu_ns=1_000_000, between_ns=100_000, edge_ns=500_000)
    go, done = stamps[1]
    stamps[1] = (go, done + 3_000_000)  # one slow pass in the first token: the median token ignores it
    later = [(g + 3_000_000, d + 3_000_000) for g, d in stamps[2:]]
    found = decode.timeline_split(stamps[:2] + later, steps=3)
    assert found["cpu_ms_per_token"] == pytest.approx(2.0)
    assert found["between_tokens_ms"] == pytest.approx(0.5)  # (0.5, 0.5): the slow pass is not a gap


@pytest.mark.parametrize(("count", "steps"), [(0, 4), (7, 2), (6, 1)])
def test_stamps_that_do_not_split_into_tokens_give_none(decode: ModuleType, count: int, steps: int) -> None:
    assert decode.timeline_split(_stamps(1, count, 1, 1, 1) if count else [], steps) is None
