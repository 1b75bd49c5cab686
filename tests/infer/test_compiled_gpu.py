"""`decode_compile` on the GPU: a one-sequence step captured with Inductor-compiled attention, norm and router modules
decodes what the stock step decodes at every read length (each compiles again), stays quiet, and falls back to the stock
modules when compiling fails.

Run on the GPU box: `pytest -q -m gpu tests/infer/test_compiled_gpu.py`.
"""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from kllama.infer.compiled import CompiledDecode
from kllama.infer.graphs import GraphedDecoder

from test_graphs_gpu import assert_same_greedy, cuda_model, decode, prompt_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("placement", ["gpu", "cpu"])
@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_compiled_steps_decode_what_stock_steps_decode(arch: str, placement: str) -> None:
    model, _ = cuda_model(arch, placement)
    short, long = prompt_of(model, length=250), prompt_of(model, length=505, seed=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiled = GraphedDecoder(model, 1, 1100, compile_steps=True)
        got = decode(compiled, short)  # reads 256 positions (compiling), then 512 (the mask's length: compiled again)
        got_long = decode(compiled, long)  # reads 512, then 1024 (again)
    assert compiled.graphed and compiled.compiled is not None, compiled.compile_reason
    assert compiled.compile_reason is None
    assert [f"{w.category.__name__}: {w.message}" for w in seen if issubclass(w.category, UserWarning)] == []
    assert {length for _, length in compiled._captured} == {256, 512, 1024}
    assert counters["stats"]["unique_graphs"] > 0
    stock = GraphedDecoder(model, 1, 1100)
    assert_same_greedy(got, decode(stock, short))
    assert_same_greedy(got_long, decode(stock, long))


def failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    raise RuntimeError("no compiler here")


def test_a_failed_compile_captures_the_stock_step(caplog) -> None:
    model, _ = cuda_model("deepseek_v2", "gpu")
    prompt = prompt_of(model)
    decoder = GraphedDecoder(model, 1, 64)
    decoder.compiled = CompiledDecode(model, backend=failing_backend)
    with caplog.at_level(logging.WARNING, logger="kllama.infer.graphs"):
        got = decode(decoder, prompt)
    assert decoder.graphed and decoder.compiled is None
    assert decoder.compile_reason.startswith("compiling failed") and "no compiler here" in decoder.compile_reason
    assert "captured without torch.compile" in caplog.text
    expected = decode(GraphedDecoder(model, 1, 64), prompt)
    assert got[0] == expected[0]
