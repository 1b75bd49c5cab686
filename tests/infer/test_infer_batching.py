"""Continuous batching in the engine: sequences joining and leaving one running batch over the slot decoder answer
exactly as they do alone (greedy, fp32, CPU: the decoder's eager steps), on every MoE family through the expert
engine; the packed layout's mask; slots handed down when a sequence leaves."""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kllama.infer import graphs
from kllama.infer.engine import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, GenerationEngine, StreamChunk
from kllama.infer.kv_cache import packed_layout
from kllama.infer.sampling import NonFiniteLogitsError, SamplingParams
from kllama.infer.sequence import Sequence

QUESTIONS = ["Hi", "Tell me about the weather today, in some detail please.", "What is 2+2?",
             "Name three colours of the rainbow and say why the sky looks blue at noon."]
GREEDY = SamplingParams(max_new_tokens=9, do_sample=False, ignore_eos=True)


def _kt_engine(model_dir: Path, prefill: int, placement: str = "cpu", device: str = "cpu", max_batch: int = 4,
               **keys: object) -> GenerationEngine:
    from kllama.config.loader import build_config
    from kllama.infer.engine import build_engine

    config = build_config({"model_name_or_path": str(model_dir), "template": "empty", "infer_dtype": "float32",
                           "infer_backend": "ktransformers", "use_kt": True, "expert_placement": placement, **keys},
                          command="chat")
    engine = build_engine(config, device=device, max_batch=max_batch)
    engine.prefill_tokens = prefill
    return engine


def _run_batch(engine: GenerationEngine, jobs: list[tuple[list[int], SamplingParams]], join_at: list[int],
               cancel_at: dict[int, int] | None = None) -> list[list[StreamChunk | BaseException]]:
    """Step the jobs together; job i joins the batch at step join_at[i] and is cancelled at step cancel_at[i]."""
    outs: list[list[StreamChunk | BaseException]] = [[] for _ in jobs]
    seqs = [engine.new_sequence(ids, params, outs[i].append, threading.Event()) for i, (ids, params) in enumerate(jobs)]
    running: list[Sequence] = []
    for step in range(500):
        running += [seq for i, seq in enumerate(seqs) if join_at[i] == step]
        for i, at in (cancel_at or {}).items():
            if at == step:
                seqs[i].cancel.set()
        ended = engine.step(running)
        running = [seq for seq in running if seq not in ended]
        if not running and step >= max(join_at):
            return outs
    raise AssertionError("the batch never finished")


def _text(chunks: list[StreamChunk | BaseException]) -> tuple[str, str | None]:
    assert all(isinstance(c, StreamChunk) for c in chunks), chunks
    return "".join(c.text for c in chunks), chunks[-1].finish_reason  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "qwen3_moe", "mixtral"])
def test_batched_greedy_equals_one_at_a_time(tiny_model_dir: Callable[..., Path], arch: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graphs, "MIN_READ", 4)  # decode steps cross read lengths 8, 16, 32 on the way
    engine = _kt_engine(tiny_model_dir(arch), prefill=5)  # prompts take several chunks
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = [engine.complete(ids, GREEDY).text for ids in prompts]
    assert len(set(alone)) > 1
    budgets = [GREEDY.updated(max_new_tokens=n) for n in (9, 4, 12, 9)]  # leave in another order than they came
    alone = [engine.complete(ids, params).text for ids, params in zip(prompts, budgets)]
    before = dict(engine.stats)
    outs = _run_batch(engine, list(zip(prompts, budgets)), join_at=[0, 0, 2, 5])
    assert [_text(o) for o in outs] == [(text, FINISH_LENGTH) for text in alone]
    assert engine.stats["max_batch"] == 4
    assert engine.stats["decode_steps"] > before["decode_steps"] and engine.stats["packed_steps"] > before["packed_steps"]
    assert engine.batch.sequences == 0  # every sequence gave its slot back


def test_each_sequence_keeps_its_own_settings_and_cancel_leaves_the_batch(engine: GenerationEngine) -> None:
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    full = engine.complete(prompts[1], GREEDY).text
    jobs = [
        (prompts[0], SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9, top_k=20, seed=11, ignore_eos=True)),
        (prompts[1], GREEDY.updated(stop=(full[3:6],))),
        (prompts[2], GREEDY.updated(repetition_penalty=1.4, max_new_tokens=6)),
        (prompts[3], GREEDY.updated(max_new_tokens=400)),
    ]
    alone = [engine.complete(ids, params) for ids, params in jobs[:3]]
    outs = _run_batch(engine, jobs, join_at=[0, 1, 1, 0], cancel_at={3: 4})
    for got, want in zip(outs[:3], alone):
        assert _text(got) == (want.text, want.finish_reason)
    assert _text(outs[1])[1] == FINISH_STOP and _text(outs[2])[1] == FINISH_LENGTH
    cancelled = outs[3][-1]
    assert isinstance(cancelled, StreamChunk) and cancelled.finish_reason == FINISH_CANCELLED
    assert cancelled.completion_tokens < 10


def test_nan_logits_fail_the_sequence_not_the_engine(tiny_model_dir: Callable[..., Path]) -> None:
    engine = _kt_engine(tiny_model_dir("qwen3_moe"), prefill=512)
    prompt = engine.encode([{"role": "user", "content": "Hi"}])
    healthy = engine.complete(prompt, GREEDY).text
    lm_head = engine.loaded.model.lm_head.weight
    saved = lm_head.detach().clone()
    with torch.no_grad():
        lm_head[7].fill_(float("nan"))  # one vocabulary row: every logits row holds a NaN
    try:
        outs = _run_batch(engine, [(prompt, GREEDY), (prompt, GREEDY.updated(do_sample=True, temperature=1.0))],
                          join_at=[0, 0])
    finally:
        with torch.no_grad():
            lm_head.copy_(saved)
    assert all(isinstance(o[-1], NonFiniteLogitsError) for o in outs)
    assert "NaN" in str(outs[0][-1])
    assert engine.complete(prompt, GREEDY).text == healthy  # the engine serves on


def test_a_lone_sequence_and_a_batch_share_one_decoder_and_a_full_batch_waits(
        tiny_model_dir: Callable[..., Path]) -> None:
    engine = _kt_engine(tiny_model_dir("qwen3_moe"), prefill=512, max_batch=2)
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    alone = [engine.complete(ids, GREEDY).text for ids in prompts]  # each one alone: slot 0, batch of 1
    assert engine.stats["max_batch"] == 1
    outs = _run_batch(engine, [(ids, GREEDY) for ids in prompts], join_at=[0, 0, 0])
    assert [_text(o) for o in outs] == [(text, FINISH_LENGTH) for text in alone]  # the third waited for a slot
    assert engine.stats["max_batch"] == 2 and engine.batch.sequences == 0


def test_interleaved_stream_callers_each_get_their_own_answer(tiny_model_dir: Callable[..., Path]) -> None:
    # Two `stream` callers step separately: in each decode step the other caller's slot sits idle.
    engine = _kt_engine(tiny_model_dir("deepseek_v2"), prefill=512, max_batch=2)
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS[1:3]]
    alone = [engine.complete(ids, GREEDY).text for ids in prompts]
    streams = [engine.stream(ids, GREEDY) for ids in prompts]
    texts = ["", ""]
    live = [0, 1]
    while live:
        for i in list(live):
            chunk = next(streams[i], None)
            if chunk is None:
                live.remove(i)
            else:
                texts[i] += chunk.text
    assert texts == alone and engine.batch.sequences == 0


def test_packed_layout_keeps_sequences_apart_causal_and_windowed() -> None:
    layout = packed_layout([(2, 0, 3), (0, 1, 2)], capacity=10, device=torch.device("cpu"), window=2)
    mask = layout.allowed[0, 0].int().tolist()
    # slot 2 reads its positions 0..2; slot 0 reads 0..2, its position 0 cached before, 1..2 new
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 1, 2]] and layout.last_index.tolist() == [2, 4]
    assert layout.write_index.tolist() == [20, 21, 22, 1, 2] and layout.read_index.tolist() == [20, 21, 22, 0, 1, 2]
    with pytest.raises(ValueError, match="at least one token"):
        packed_layout([(0, 0, 0)], capacity=4, device=torch.device("cpu"))


def test_leaving_sequence_hands_its_slot_to_the_last_one(engine: GenerationEngine) -> None:
    decoder = graphs.GraphedDecoder(engine.loaded.model, 3, 16)
    decoder.allocate()
    layer = decoder.cache.layers[0]
    with torch.inference_mode():  # the storage is made under inference mode
        for slot in range(3):
            layer.key_rows[slot * decoder.capacity:(slot + 1) * decoder.capacity] = slot + 1
    decoder.move(2, 0, 5)
    rows = layer.key_rows.view(3, decoder.capacity, -1)
    assert (rows[0, :5] == 3).all() and (rows[0, 5:] == 1).all() and (rows[1] == 2).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("placement", ["cpu", "gpu", "auto"])
def test_batched_greedy_equals_one_at_a_time_on_cuda(tiny_model_dir: Callable[..., Path], placement: str) -> None:
    # auto with gpu_memory_utilization 0: the CPU decode and streamed prefill paths (the default fills the GPU)
    keep = {"gpu_memory_utilization": 0} if placement == "auto" else {}
    engine = _kt_engine(tiny_model_dir("deepseek_v2"), prefill=5, placement=placement, device="cuda", **keep)
    assert engine.loaded.device.type == "cuda"
    prompts = [engine.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    alone = [engine.complete(ids, GREEDY).text for ids in prompts]
    outs = _run_batch(engine, [(ids, GREEDY) for ids in prompts], join_at=[0, 0, 2, 5])
    assert [_text(o) for o in outs] == [(text, FINISH_LENGTH) for text in alone]
    assert engine.stats["max_batch"] == 4
