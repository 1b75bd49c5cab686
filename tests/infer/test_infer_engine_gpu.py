"""The engine on CUDA: decode steps replayed as CUDA graphs answer the same greedy tokens as the same engine with
eager steps, for `kllama chat` turns (one slot) and for a continuous batch that sequences join and leave (fp32,
tiny model, each backend and expert placement).

Run on the GPU box: `pytest -q -m gpu tests/infer/test_infer_engine_gpu.py`.
"""
from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
import torch

from kllama.config.loader import build_config
from kllama.infer.chat import ChatSession, repl
from kllama.infer.engine import GenerationEngine, build_engine
from kllama.infer.sampling import SamplingParams
from kllama.infer.sequence import Sequence, StreamChunk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = {  # name -> config keys; `graphed`: whether every step must be a replayed graph
    "kt-gpu": ({"infer_backend": "ktransformers", "use_kt": True, "expert_placement": "gpu"}, True),
    "kt-cpu": ({"infer_backend": "ktransformers", "use_kt": True, "expert_placement": "cpu"}, True),
    # auto with the GPU left to the KV cache: CPU decode steps, streamed prefills
    "kt-auto": ({"infer_backend": "ktransformers", "use_kt": True, "expert_placement": "auto",
                 "gpu_memory_utilization": 0}, True),
    # auto as a user gets it: the layers fill the GPU memory the KV cache leaves
    "kt-auto-filled": ({"infer_backend": "ktransformers", "use_kt": True, "expert_placement": "auto"}, True),
    "huggingface": ({}, False),  # stock MoE blocks may sync with the host: a failed capture falls back to eager
}
QUESTIONS = [f"Question {i}: what do experts of a mixture {'do ' * i}compute?" for i in range(8)]


def _engines(moe_model: Path, adapter: Path, backend: str, max_batch: int) -> tuple[GenerationEngine, GenerationEngine]:
    """(graphed, eager) engines over one loaded model."""
    keys, _ = BACKENDS[backend]
    config = build_config({"model_name_or_path": str(moe_model), "adapter_name_or_path": str(adapter),
                           "template": "deepseek", "infer_dtype": "float32", **keys}, command="chat")
    graphed = build_engine(config, device="cuda", max_batch=max_batch)
    assert graphed.loaded.device.type == "cuda"
    eager = GenerationEngine(graphed.loaded, graphed.renderer, graphed.defaults, max_batch=max_batch,
                             max_len=graphed.context_length, use_graphs=False)
    return graphed, eager


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_chat_greedy_with_graphs_equals_eager_steps(moe_model: Path, moe_adapter_rank_r: Path, backend: str) -> None:
    graphed, eager = _engines(moe_model, moe_adapter_rank_r, backend, max_batch=1)  # what `kllama chat` builds
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    lines = "Say something about GPUs.\nAnd about experts?\nOne more thing.\n"
    outs = []
    for engine in (graphed, eager):
        out = io.StringIO()
        repl(ChatSession(engine, "You are kllama.", params=params), io.StringIO(lines), out, interactive=False)
        outs.append(out.getvalue())
    assert outs[0] == outs[1] and outs[0].count("Assistant: ") == 3
    decoder = graphed.decoder
    if BACKENDS[backend][1]:
        assert decoder.graphed, decoder.reason
        assert list(decoder._captured) == [(1, 256)]  # captured once, replayed by every turn


def _run_batch(engine: GenerationEngine, prompts: list[list[int]], params: list[SamplingParams],
               join_at: list[int]) -> list[str]:
    outs: list[list[StreamChunk | BaseException]] = [[] for _ in prompts]
    seqs = [engine.new_sequence(ids, p, outs[i].append, threading.Event()) for i, (ids, p) in
            enumerate(zip(prompts, params))]
    running: list[Sequence] = []
    for step in range(1000):
        running += [seq for i, seq in enumerate(seqs) if join_at[i] == step]
        ended = engine.step(running)
        running = [seq for seq in running if seq not in ended]
        if not running and step >= max(join_at):
            break
    assert all(isinstance(c, StreamChunk) for out in outs for c in out), outs
    return ["".join(c.text for c in out) for out in outs]


@pytest.mark.parametrize("backend", ["kt-gpu", "kt-cpu", "kt-auto"])
def test_graphed_batch_steps_equal_eager_batch_steps(moe_model: Path, moe_adapter_rank_r: Path, backend: str) -> None:
    graphed, eager = _engines(moe_model, moe_adapter_rank_r, backend, max_batch=8)
    prompts = [graphed.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = [SamplingParams(max_new_tokens=n, do_sample=False, ignore_eos=True) for n in (20, 9, 14, 20, 5, 17, 20, 11)]
    # buckets 2, 4, 8 and back as answers end: at most 6 answers run at once (steps 6-7 and 10-14), in bucket 8
    join_at = [0, 0, 1, 3, 3, 6, 10, 10]
    got = _run_batch(graphed, prompts, params, join_at)
    expected = _run_batch(eager, prompts, params, join_at)
    assert got == expected
    assert graphed.decoder.graphed, graphed.decoder.reason
    # stats["max_batch"] counts sequences stepped together (6 here), not the bucket they ran in (8)
    assert graphed.decoder.captures >= 3 and graphed.stats["max_batch"] == eager.stats["max_batch"] == 6
    assert graphed.stats["decode_steps"] == eager.stats["decode_steps"] > 0
    alone = [graphed.complete(ids, p).text for ids, p in zip(prompts, params)]
    assert got == alone


def test_auto_layers_fill_the_gpu_after_the_kv_cache(moe_model: Path, moe_adapter_rank_r: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # gpu_memory_utilization (default 0.9): every auto layer of the tiny model fits, bottom first; explicit
    # placements, 0 and a utilization below the reserve keep the placement table's targets
    base = {"model_name_or_path": str(moe_model), "adapter_name_or_path": str(moe_adapter_rank_r),
            "template": "deepseek", "infer_dtype": "float32", "infer_backend": "ktransformers", "use_kt": True}

    def engine(**keys: object) -> GenerationEngine:
        return build_engine(build_config({**base, **keys}, command="chat"), device="cuda")

    def modes(e: GenerationEngine) -> list[str]:
        return [m.placement.mode for m in e.loaded.engine.modules.values()]

    filled = engine()
    assert modes(filled) == ["gpu"] * len(modes(filled)) and filled.filled_layers == list(filled.loaded.engine.modules)
    assert "keep their experts resident" in capsys.readouterr().out
    kept = engine(gpu_memory_utilization=0)
    assert set(modes(kept)) == {"auto"} and kept.filled_layers == []
    assert set(modes(engine(gpu_memory_utilization=0.001))) == {"auto"}  # less than the reserve: none
    assert set(modes(engine(expert_placement="cpu"))) == {"cpu"}
    prompt = filled.encode([{"role": "user", "content": "Say something about GPUs."}])
    params = SamplingParams(max_new_tokens=16, do_sample=False, ignore_eos=True)
    assert filled.complete(prompt, params).text == kept.complete(prompt, params).text
    assert filled.decoder.graphed, filled.decoder.reason


def test_a_gpu_engine_warms_up_at_build_without_counting_it(moe_model: Path) -> None:
    # On CUDA the build ends with the warm-up answer (warmup.py: one packed prompt read, one decode step), which pays
    # the process's first prefill before any request; its steps are not the engine's. Whether it removes the
    # first-request delay is measured by benchmarks/user_path.py's chat phase (the first answer's first-token time),
    # not here: a tiny model's cold prefill is too short for a bound that could fail.
    config = build_config({"model_name_or_path": str(moe_model), "template": "deepseek", "infer_dtype": "bfloat16",
                           **BACKENDS["kt-gpu"][0]}, command="chat")
    engine = build_engine(config, device="cuda")
    assert engine.warmup_s is not None
    assert (engine.warmup_steps["packed_steps"], engine.warmup_steps["decode_steps"]) == (1, 1)
    assert not engine.stats["packed_steps"] and not engine.stats["requests"] and engine.batch.sequences == 0
    prompt = engine.encode([{"role": "user", "content": "Say something about GPUs."}])
    engine.complete(prompt, SamplingParams(max_new_tokens=2, do_sample=False, ignore_eos=True))
    assert engine.stats["packed_steps"] == 1 and engine.stats["requests"] == 1
