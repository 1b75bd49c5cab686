"""`kllama chat` on CUDA: every turn runs on the single stream with its decode steps replayed as CUDA graphs, and
answers the same greedy tokens as the eager batch path (fp32, tiny model, each backend and expert placement).

Run on the GPU box: `pytest -q -m gpu tests/infer/test_infer_single_stream_gpu.py`.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from kllama.config.loader import build_config
from kllama.infer.chat import ChatSession, repl
from kllama.infer.engine import GenerationEngine, build_engine
from kllama.infer.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = {  # name -> config keys; `graphed`: whether every step must be a replayed graph
    "kt-gpu": ({"infer_backend": "ktransformers", "use_kt": True, "expert_placement": "gpu"}, True),
    "kt-cpu": ({"infer_backend": "ktransformers", "use_kt": True, "expert_placement": "cpu"}, True),
    "huggingface": ({}, False),  # stock MoE blocks may sync with the host: a failed capture falls back to eager
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_chat_greedy_with_graphs_equals_the_eager_batch_path(moe_model: Path, moe_adapter_rank_r: Path,
                                                             backend: str) -> None:
    keys, must_graph = BACKENDS[backend]
    config = build_config({"model_name_or_path": str(moe_model), "adapter_name_or_path": str(moe_adapter_rank_r),
                           "template": "deepseek", "infer_dtype": "float32", **keys}, command="chat")
    graphed = build_engine(config, device="cuda")  # what `kllama chat` builds: the single stream is on with CUDA
    assert graphed.loaded.device.type == "cuda" and graphed.single is not None
    eager = GenerationEngine(graphed.loaded, graphed.renderer, graphed.defaults, single_stream=False)
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    lines = "Say something about GPUs.\nAnd about experts?\nOne more thing.\n"
    outs = []
    for engine in (graphed, eager):
        out = io.StringIO()
        repl(ChatSession(engine, "You are kllama.", params=params), io.StringIO(lines), out, interactive=False)
        outs.append(out.getvalue())
    assert outs[0] == outs[1] and outs[0].count("Assistant: ") == 3
    decoder = graphed.single.decoder
    assert graphed.stats["single_stream"] == 3 and graphed.decoder.cache.pool_bytes() == 0
    if must_graph:
        assert decoder.graphed, decoder.reason
        assert list(decoder._captured) == [1]  # captured once, replayed by every turn
