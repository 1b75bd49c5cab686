"""The generation engine against transformers' own `generate`, sampling knobs, stop strings, cancellation."""
from __future__ import annotations

import logging
import threading

import pytest
import torch

from kllama.errors import KllamaError
from kllama.infer.engine import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from kllama.infer.sampling import SamplingParams
from kllama.model.adapters import check_adapter_templates

MESSAGES = [{"role": "user", "content": "Tell me about the weather today."}]


def hf_generate(engine, prompt: list[int], **kw) -> list[int]:  # noqa: ANN001
    with torch.no_grad():
        out = engine.loaded.model.generate(torch.tensor([prompt]), do_sample=False, eos_token_id=None,
                                           pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers_generate(engine, penalty: float) -> None:  # noqa: ANN001
    prompt = engine.encode(MESSAGES)
    params = SamplingParams(max_new_tokens=12, do_sample=False, repetition_penalty=penalty, ignore_eos=True)
    result = engine.complete(prompt, params)
    expected = hf_generate(engine, prompt, max_new_tokens=12, repetition_penalty=penalty)
    assert result.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert (result.finish_reason, result.completion_tokens, result.prompt_tokens) == (FINISH_LENGTH, 12, len(prompt))


def test_temperature_zero_is_greedy_and_seed_reproduces_samples(engine) -> None:  # noqa: ANN001
    prompt = engine.encode(MESSAGES)
    greedy = engine.complete(prompt, SamplingParams(max_new_tokens=8, do_sample=False, ignore_eos=True)).text
    assert engine.complete(prompt, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)).text == greedy
    assert engine.complete(prompt, SamplingParams(max_new_tokens=8, top_k=1, ignore_eos=True)).text == greedy
    hot = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=7, ignore_eos=True)
    samples = {engine.complete(prompt, hot.updated(seed=s)).text for s in range(3)}
    assert engine.complete(prompt, hot).text == engine.complete(prompt, hot).text
    assert len(samples) > 1


def test_stop_string_ends_the_answer_before_it(engine) -> None:  # noqa: ANN001
    prompt = engine.encode(MESSAGES)
    full = engine.complete(prompt, SamplingParams(max_new_tokens=12, do_sample=False, ignore_eos=True)).text
    stop = full[4:7]
    assert stop.strip(), full
    cut = engine.complete(prompt, SamplingParams(max_new_tokens=12, do_sample=False, stop=(stop,), ignore_eos=True))
    assert cut.text == full[: full.find(stop)]
    assert cut.finish_reason == FINISH_STOP


def test_stream_concatenates_to_complete_and_cancel_stops_it(engine) -> None:  # noqa: ANN001
    prompt = engine.encode(MESSAGES)
    params = SamplingParams(max_new_tokens=10, do_sample=False, ignore_eos=True)
    chunks = list(engine.stream(prompt, params))
    assert "".join(c.text for c in chunks) == engine.complete(prompt, params).text
    assert [c.finish_reason for c in chunks][-1] == FINISH_LENGTH
    cancel = threading.Event()
    got = []
    for chunk in engine.stream(prompt, params.updated(max_new_tokens=500), cancel):
        got.append(chunk)
        cancel.set()
    assert got[-1].finish_reason == FINISH_CANCELLED and len(got) <= 3


def test_prompt_filling_the_context_is_refused(engine) -> None:  # noqa: ANN001
    with pytest.raises(KllamaError, match="context"):
        list(engine.stream([5] * engine.context_length, SamplingParams(max_new_tokens=4)))


def test_template_mismatch_warns(engine, moe_adapter, caplog) -> None:  # noqa: ANN001
    from kllama.config.loader import build_config

    config = build_config({"model_name_or_path": "m", "adapter_name_or_path": str(moe_adapter), "template": "deepseek"},
                          command="chat", check_paths=False)
    with caplog.at_level(logging.WARNING):
        warnings = check_adapter_templates(config.data.template, [moe_adapter])
    assert len(warnings) == 1 and "llama3" in warnings[0] and "deepseek" in warnings[0]
    config = build_config({"model_name_or_path": "m", "template": "llama3"}, command="chat", check_paths=False)
    assert check_adapter_templates(config.data.template, [moe_adapter]) == []
