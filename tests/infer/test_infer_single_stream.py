"""The single stream (a lone sequence decoded through the static-cache decoder; CPU: its eager fallback) answers
exactly as the batch path does (greedy, fp32, expert engine), and hands its sequence to the batch path when a second
one arrives: engine steps, the API's scheduler thread, and `kllama chat` turns."""
from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from kllama.infer.chat import ChatSession, repl
from kllama.infer.engine import FINISH_LENGTH, FINISH_STOP, GenerationEngine, StreamChunk
from kllama.infer.sampling import SamplingParams
from kllama.infer.scheduler import Scheduler
from kllama.infer.sequence import Sequence
from kllama.infer.single_stream import MIN_STATIC_LEN, static_length

QUESTIONS = ["Hi", "Tell me about the weather today, in some detail please.", "What is 2+2?"]
GREEDY = SamplingParams(max_new_tokens=9, do_sample=False, ignore_eos=True)
Chunks = list[StreamChunk | BaseException]


def _engines(model_dir: Path, prefill: int) -> tuple[GenerationEngine, GenerationEngine]:
    """(single-stream engine, batch-only engine) over one loaded model: expert engine, CPU experts, fp32."""
    from kllama.config.loader import build_config
    from kllama.infer.engine import build_engine

    config = build_config({"model_name_or_path": str(model_dir), "template": "empty", "infer_dtype": "float32",
                           "infer_backend": "ktransformers", "use_kt": True, "expert_placement": "cpu"},
                          command="chat")
    single = build_engine(config, device="cpu", single_stream=True)
    single.prefill_tokens = prefill
    batched = GenerationEngine(single.loaded, single.renderer, single.defaults, prefill, single_stream=False)
    assert batched.single is None
    return single, batched


def _text(chunks: Chunks) -> tuple[str, str | None]:
    assert all(isinstance(c, StreamChunk) for c in chunks), chunks
    return "".join(c.text for c in chunks), chunks[-1].finish_reason  # type: ignore[union-attr]


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
def test_single_stream_answers_as_the_batch_path(tiny_model_dir: Callable[..., Path], arch: str) -> None:
    single, batched = _engines(tiny_model_dir(arch), prefill=5)  # prompts take several chunks on both paths
    prompts = [single.encode([{"role": "user", "content": q}]) for q in QUESTIONS]
    full = batched.complete(prompts[1], GREEDY).text
    jobs = [(ids, GREEDY) for ids in prompts] + [
        (prompts[1], GREEDY.updated(stop=(full[4:7],))),  # a stop string inside the answer
        (prompts[0], GREEDY.updated(max_new_tokens=2)),
        (prompts[2], SamplingParams(max_new_tokens=7, do_sample=False)),  # end-of-turn ids honoured
        (prompts[2], GREEDY.updated(repetition_penalty=1.4)),
        (prompts[0], SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9, top_k=20, seed=11, ignore_eos=True)),
    ]
    expected = [batched.complete(ids, params) for ids, params in jobs]
    got = [single.complete(ids, params) for ids, params in jobs]
    assert got == expected
    assert [c.finish_reason for c in got[:3]] == [FINISH_LENGTH] * 3
    assert got[3].finish_reason == FINISH_STOP and len(got[3].text) < len(full)
    assert got[4].completion_tokens == 2
    assert single.stats["single_stream"] == len(jobs) and single.stats["moved_to_batch"] == 0
    assert single.decoder.cache.pool_bytes() == 0  # the paged batch path never ran
    assert single.single.decoder.max_len == MIN_STATIC_LEN and single.single.seq is None


def _run(engine: GenerationEngine, jobs: list[tuple[list[int], SamplingParams]], join_at: list[int],
         on_join: Callable[[list[Sequence]], None] = lambda seqs: None) -> list[Chunks]:
    """Step the jobs together, job i joining at step join_at[i] (`on_join` sees the sequences just before)."""
    outs: list[Chunks] = [[] for _ in jobs]
    seqs = [engine.new_sequence(ids, params, outs[i].append) for i, (ids, params) in enumerate(jobs)]
    running: list[Sequence] = []
    for step in range(500):
        joining = [seq for i, seq in enumerate(seqs) if join_at[i] == step]
        if joining and running:
            on_join(seqs)
        running += joining
        ended = engine.step(running)
        running = [seq for seq in running if seq not in ended]
        if not running and step >= max(join_at):
            return outs
    raise AssertionError("the sequences never finished")


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen3_moe"])
@pytest.mark.parametrize("moment", ["reading its prompt", "answering"])
def test_second_sequence_moves_the_single_stream_into_the_batch(tiny_model_dir: Callable[..., Path], arch: str,
                                                                moment: str) -> None:
    single, batched = _engines(tiny_model_dir(arch), prefill=4)
    prompts = [single.encode([{"role": "user", "content": q}]) for q in QUESTIONS[1:]]
    jobs = [(prompts[0], GREEDY.updated(max_new_tokens=14)), (prompts[1], GREEDY)]
    expected = [(batched.complete(ids, params).text, FINISH_LENGTH) for ids, params in jobs]
    prompt_steps = -(-len(prompts[0]) // 4)
    join = 1 if moment == "reading its prompt" else prompt_steps + 4
    seen: dict[str, int] = {}

    def on_join(seqs: list[Sequence]) -> None:
        seen.update(fed=seqs[0].fed, produced=seqs[0].produced, alone=int(single.single.seq is seqs[0]))

    outs = _run(single, jobs, join_at=[0, join], on_join=on_join)
    assert [_text(o) for o in outs] == expected
    assert seen["alone"] == 1  # the first sequence was on the single stream until the second one came
    if moment == "answering":
        assert seen["produced"] == 5 and seen["fed"] == len(prompts[0]) + 4
    else:
        assert 0 < seen["fed"] < len(prompts[0]) and seen["produced"] == 0
    assert single.stats["single_stream"] == 1 and single.stats["moved_to_batch"] == 1
    assert single.stats["max_batch"] == 2 and single.decoder.cache.sequences == 0
    # the engine is idle again: the next lone sequence takes the (same) single stream
    decoder = single.single.decoder
    assert single.complete(prompts[1], GREEDY).text == expected[1][0]
    assert single.stats["single_stream"] == 2 and single.single.decoder is decoder


def test_api_scheduler_moves_a_lone_request_when_a_second_arrives(tiny_model_dir: Callable[..., Path]) -> None:
    single, batched = _engines(tiny_model_dir("qwen3_moe"), prefill=512)
    prompts = [single.encode([{"role": "user", "content": q}]) for q in QUESTIONS[1:]]
    params = [GREEDY.updated(max_new_tokens=30), GREEDY]
    expected = [batched.complete(ids, p).text for ids, p in zip(prompts, params)]
    scheduler = Scheduler(single, max_batch=4, max_queue=4)
    outs: list[Chunks] = [[], []]
    done = [threading.Event(), threading.Event()]

    def emit(index: int):  # noqa: ANN202 - the emit callback of request `index`
        def put(item: StreamChunk | BaseException) -> None:
            outs[index].append(item)
            if index == 0 and len(outs[0]) == 1:  # the first request is streaming alone: the second one arrives
                scheduler.submit([single.new_sequence(prompts[1], params[1], emit(1))])
            if isinstance(item, BaseException) or item.finish_reason is not None:
                done[index].set()
        return put

    try:
        scheduler.submit([single.new_sequence(prompts[0], params[0], emit(0))])
        assert all(event.wait(60) for event in done)
    finally:
        scheduler.close()
    assert [_text(o) for o in outs] == [(text, FINISH_LENGTH) for text in expected]
    assert single.stats["single_stream"] == 1 and single.stats["moved_to_batch"] == 1
    assert single.stats["max_batch"] == 2


def test_chat_turns_use_the_single_stream_and_ctrl_c_frees_it(engine: GenerationEngine) -> None:
    assert engine.single is None  # the default on the CPU: the batch path
    single = GenerationEngine(engine.loaded, engine.renderer, engine.defaults, single_stream=True)  # with its adapter
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    session, reference = ChatSession(single, "You are kllama.", params=params), \
        ChatSession(engine, "You are kllama.", params=params)
    out, expected = io.StringIO(), io.StringIO()
    repl(session, io.StringIO("Hello there\nHow are you?\n"), out, interactive=False)
    repl(reference, io.StringIO("Hello there\nHow are you?\n"), expected, interactive=False)
    assert out.getvalue() == expected.getvalue() and session.history == reference.history
    assert single.stats["single_stream"] == 2 and single.decoder.cache.pool_bytes() == 0

    written: list[str] = []

    def write(text: str) -> None:
        written.append(text)
        if len(written) == 2:  # Ctrl-C while the second piece is shown
            raise KeyboardInterrupt

    session.params = SamplingParams(max_new_tokens=50, do_sample=False, ignore_eos=True)
    session.answer("Go on", write)
    assert written[-1] == " [stopped]" and single.single.seq is None  # the slot is free again
    session.params = params
    want = engine.complete(engine.encode([*session.history, {"role": "user", "content": "And then?"}],
                                         session.system), params).text
    assert session.answer("And then?", lambda text: None) == want
    assert single.stats["single_stream"] == 4 and single.stats["moved_to_batch"] == 0


def test_decoder_is_built_for_the_longest_request_seen(tiny_model_dir: Callable[..., Path]) -> None:
    single, _ = _engines(tiny_model_dir("qwen3_moe"), prefill=512)
    prompt = single.encode([{"role": "user", "content": "Hi"}])
    seq = single.new_sequence(prompt, GREEDY.updated(max_new_tokens=400), lambda item: None)
    single.step([seq])  # reads the prompt (and picks the first token)
    first = single.single.decoder
    assert first.max_len == 512 and single.single.seq is seq
    single.release(seq)
    assert single.single.seq is None
    single.complete(prompt, GREEDY)  # a shorter request reuses the bigger decoder
    assert single.single.decoder is first
    assert static_length(300, 2048) == 512 and static_length(2000, 2048) == 2048 and static_length(9, 100) == 100
