"""Sizing the slot KV cache: bytes per cached token measured from the model, kt_maxlen lowered to what fits."""
from __future__ import annotations

import logging

import pytest

from kllama.infer.graphs import GraphedDecoder
from kllama.infer.kv_budget import MIN_POSITIONS, fit_positions, fitted_positions, kv_bytes_per_token, reserve_bytes


@pytest.mark.parametrize(("requested", "budget_tokens", "expected"), [
    (4096, 4 * 4097, 4096),  # fits as asked
    (4096, 4 * 1100, 1024),  # the largest power of two below that fits
    (3000, 4 * 2049, 2048),  # a requested size that is no power of two
    (4096, 4 * 300, MIN_POSITIONS),
    (4096, 4 * 200, 0),  # not even the minimum
])
def test_fit_positions(requested: int, budget_tokens: int, expected: int) -> None:
    assert fit_positions(requested, 4, 10, budget_tokens * 10) == expected


def test_bytes_per_token_predict_the_cache_and_the_default_is_lowered_to_fit(engine, caplog) -> None:  # noqa: ANN001
    model = engine.loaded.model
    per_token = kv_bytes_per_token(model)
    assert per_token > 0
    assert GraphedDecoder(model, 3, 10).allocate() == 3 * 11 * per_token
    reserve = reserve_bytes(engine.loaded)
    plenty = reserve + 4 * 4097 * per_token
    assert fitted_positions(engine.loaded, 4, 4096, plenty) == 4096
    with caplog.at_level(logging.WARNING, logger="kllama.infer.kv_budget"):
        assert fitted_positions(engine.loaded, 4, 4096, reserve + 4 * 600 * per_token) == 512
    assert "each sequence gets 512 tokens (kt_maxlen)" in caplog.text and "API_MAX_BATCH" in caplog.text
    assert fitted_positions(engine.loaded, 4, 4096, reserve) == 4096  # nothing fits: allocation will say so
