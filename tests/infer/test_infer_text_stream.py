"""Incremental detokenisation and stop-string matching."""
from __future__ import annotations

import pytest

from kllama.infer.text_stream import IncrementalDecoder, StopStringMatcher
from kllama.model.tokenizer import build_tokenizer


def test_incremental_decoder_reassembles_the_full_decode() -> None:
    tok = build_tokenizer("deepseek_v2")
    text = "Hello world, ünïcödé and 日本語 text — spaced   out."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def feed_all(matcher: StopStringMatcher, deltas: list[str]) -> str:
    return "".join(matcher.feed(d) for d in deltas) + matcher.flush()


@pytest.mark.parametrize(
    ("deltas", "stops", "expected", "stopped"),
    [
        (["Hello ", "wor", "ld"], ["END"], "Hello world", False),
        (["Hello E", "N", "D and more"], ["END"], "Hello ", True),
        (["abc", "STOP"], ["STOP", "bcS"], "a", True),  # the earliest match wins
        (["tail E"], ["END"], "tail E", False),  # a held-back partial match is released at the end
        (["xx", "Y"], [], "xxY", False),
    ],
)
def test_stop_strings(deltas: list[str], stops: list[str], expected: str, stopped: bool) -> None:
    matcher = StopStringMatcher(stops)
    assert feed_all(matcher, deltas) == expected
    assert matcher.stopped is stopped


def test_stop_string_prefix_is_held_back_until_decided() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("ok </ans") == "ok "  # "</ans" could start the stop string
    assert matcher.feed("wer>") == ""
    assert matcher.stopped


def test_first_answer_token_always_emits_a_chunk() -> None:
    # A random full-size model mostly picks ids whose text is empty (special tokens, ids past a small tokenizer):
    # the first token still produces a chunk, so the API's first event marks when the answer began.
    import torch

    from kllama.infer.sampling import SamplingParams
    from kllama.infer.sequence import Sequence, StreamChunk

    tok = build_tokenizer("deepseek_v2")
    silent = tok.convert_tokens_to_ids("<pad>")
    word = tok("hello", add_special_tokens=False)["input_ids"][0]
    out: list[StreamChunk | BaseException] = []
    seq = Sequence.start([1, 2], SamplingParams(max_new_tokens=5, ignore_eos=True), 5, frozenset(), tok,
                         torch.device("cpu"), out.append)
    seq.accept(silent)
    assert out == [StreamChunk("")]
    seq.accept(silent)
    assert out == [StreamChunk("")]  # later empty tokens stay silent
    seq.accept(word)
    assert [c.text for c in out] == ["", tok.decode([word])]
