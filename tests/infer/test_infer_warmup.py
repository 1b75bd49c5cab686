"""The engine's warm-up (warmup.py), forced on the CPU: it reads a real prompt and runs a decode step, and leaves
the engine as an engine built without it (counters, free slots, answers, the global RNG)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kllama.config.loader import build_config
from kllama.infer.engine import GenerationEngine, build_engine
from kllama.infer.graphs import GraphedDecoder
from kllama.infer.kv_cache import transformers_model
from kllama.infer.sampling import SamplingParams
from kllama.infer.warmup import WARMUP_ANSWER_TOKENS, WARMUP_PROMPT_TOKENS

MESSAGES = [{"role": "user", "content": "Tell me about the weather today."}]
# sampling with every processor and no seed: the warm-up answers under these defaults, so it draws tokens too
HOT = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1, do_sample=True,
                     ignore_eos=True)


def _engine(base: GenerationEngine, warm_up: bool, defaults: SamplingParams | None = None) -> GenerationEngine:
    """An engine over `base`'s loaded model (same renderer and cache size), warmed up or not."""
    return GenerationEngine(base.loaded, base.renderer, defaults or base.defaults, max_batch=base.max_batch,
                            max_len=base.context_length, warm_up=warm_up)


def _answer(engine: GenerationEngine, params: SamplingParams) -> str:
    return engine.complete(engine.encode(MESSAGES), params).text


def test_the_cpu_default_runs_no_warm_up(engine: GenerationEngine) -> None:
    assert engine.warmup_s is None and not engine.warmup_steps


def test_build_engine_warms_up_when_asked(moe_model: Path, moe_adapter: Path) -> None:
    config = build_config({"model_name_or_path": str(moe_model), "adapter_name_or_path": str(moe_adapter),
                           "template": "deepseek", "infer_dtype": "float32", "do_sample": False}, command="chat")
    warm = build_engine(config, device="cpu", max_batch=2, warm_up=True)
    assert warm.warmup_s is not None and warm.warmup_s > 0
    assert (warm.warmup_steps["packed_steps"], warm.warmup_steps["decode_steps"]) == (1, 1)
    assert not warm.stats and warm.batch.sequences == 0


def test_warm_up_reads_a_prompt_and_runs_a_decode_step(engine: GenerationEngine) -> None:
    shapes: list[tuple[int, ...]] = []
    hook = transformers_model(engine.loaded.model).register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        _engine(engine, warm_up=False)
        cold = list(shapes)
        shapes.clear()
        warm = _engine(engine, warm_up=True)
    finally:
        hook.remove()
    # the build's own forwards, then the prompt read in one packed step and one token decoded
    assert shapes[:len(cold)] == cold
    read, decoded = shapes[len(cold):]
    assert read[0] == 1 and 16 <= read[1] <= WARMUP_PROMPT_TOKENS and decoded == (1, 1)
    assert (warm.warmup_steps["packed_steps"], warm.warmup_steps["decode_steps"]) == (1, 1)
    assert warm.warmup_steps["generated_tokens"] == WARMUP_ANSWER_TOKENS


def test_warm_up_leaves_counters_slots_and_captures_as_built_without_it(engine: GenerationEngine) -> None:
    cold, warm = _engine(engine, warm_up=False), _engine(engine, warm_up=True)
    assert dict(warm.stats) == dict(cold.stats) == {}  # what /health reports
    assert warm.batch.sequences == cold.batch.sequences == 0
    assert warm.decoder.captures == cold.decoder.captures
    # every slot is free: a full batch of newcomers gets a slot each in one step
    for e in (cold, warm):
        seqs = [e.new_sequence(e.encode(MESSAGES), SamplingParams(max_new_tokens=4, do_sample=False, ignore_eos=True),
                               lambda chunk: None) for _ in range(e.max_batch)]
        e.step(seqs)
        assert e.batch.sequences == e.max_batch
        while any(not seq.done for seq in seqs):
            e.step(seqs)
        assert e.batch.sequences == 0
    assert dict(warm.stats) == dict(cold.stats)  # the same requests leave the same counters (max_step_tokens too)


def test_warm_up_changes_no_answer(engine: GenerationEngine) -> None:
    rng = torch.random.get_rng_state()
    warm = _engine(engine, warm_up=True, defaults=HOT)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the warm-up sampled with a generator of its own
    cold = _engine(engine, warm_up=False, defaults=HOT)
    greedy = SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)
    assert _answer(warm, greedy) == _answer(cold, greedy)
    assert _answer(warm, HOT.updated(seed=11)) == _answer(cold, HOT.updated(seed=11))
    answers = []
    for e in (warm, cold):
        torch.manual_seed(3)
        answers.append(_answer(e, HOT))  # unseeded: the global RNG
    assert answers[0] == answers[1]


def test_a_failing_warm_up_is_logged_and_frees_its_slot(engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: GraphedDecoder, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no prompt today")

    monkeypatch.setattr(GraphedDecoder, "packed", broken)
    with caplog.at_level(logging.WARNING, logger="kllama.infer.warmup"):
        warm = _engine(engine, warm_up=True)
    assert "warm-up answer failed (RuntimeError: no prompt today)" in caplog.text
    assert warm.batch.sequences == 0 and not warm.stats
    monkeypatch.undo()
    greedy = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
    assert _answer(warm, greedy) == _answer(_engine(engine, warm_up=False), greedy)
