"""LLaMA-Factory's truncation rule, each branch with concrete lengths, and its use on pairs and SFT turns."""
from __future__ import annotations

import pytest

from kllama.data import IGNORE_INDEX, get_template, truncate_lengths
from kllama.data.tokenize_pairs import tokenize_pair, tokenize_sft


@pytest.mark.parametrize(
    "src, tgt, cutoff, want",
    [
        # 2*tgt < cutoff: the response keeps everything, the prompt gets the rest (100 - 20 = 80).
        (100, 20, 100, (80, 20)),
        (10, 20, 100, (10, 20)),  # nothing to cut
        # 2*src < cutoff (and the response is long): response gets cutoff - src = 70.
        (30, 200, 100, (30, 70)),
        # both long: proportional, max_tgt = int(100 * 100 / 400) = 25, prompt 75.
        (300, 100, 100, (75, 25)),
        # proportional with rounding down: int(10 * 7 / 12) = 5, prompt 5.
        (5, 7, 10, (5, 5)),
    ],
)
def test_truncate_lengths_branches(src, tgt, cutoff, want):
    assert truncate_lengths(src, tgt, cutoff) == want


def test_pair_truncation_uses_the_longer_answer(family_tokenizer):
    tok = family_tokenizer("empty")
    template = get_template("empty", tok)
    # One token per character here is not guaranteed, so measure the untruncated lengths first.
    prompt = [{"role": "user", "content": "What is the capital of France? " * 6}]
    long_answer, short_answer = "Paris is the capital of France. " * 6, "Paris."
    p, c, r = template.encode_pair(tok, prompt, long_answer, short_answer, None, cutoff_len=None)
    cutoff = 40
    src, tgt = truncate_lengths(len(p), max(len(c), len(r)), cutoff)
    assert src + tgt <= cutoff and tgt < len(c)
    p2, c2, r2 = template.encode_pair(tok, prompt, long_answer, short_answer, None, cutoff_len=cutoff)
    assert (p2, c2, r2) == (p[:src], c[:tgt], r[:tgt])
    row = tokenize_pair({"system": "", "prompt": prompt, "chosen": long_answer, "rejected": short_answer},
                        tokenizer=tok, template=template, cutoff_len=cutoff)
    assert row["truncated"] and row["num_tokens"] == len(p) + len(c)
    assert row["chosen_input_ids"] == p2 + c2 and row["rejected_input_ids"] == p2 + r2
    assert row["chosen_labels"] == [IGNORE_INDEX] * len(p2) + c2
    assert len(row["chosen_input_ids"]) <= cutoff


def test_sft_truncation_spends_the_budget_turn_by_turn(family_tokenizer):
    tok = family_tokenizer("llama3")
    template = get_template("llama3", tok)
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine, thank you."}] * 3
    pairs = template.encode_multiturn(tok, messages, None)
    (s1, t1), (s2, t2) = pairs[0], pairs[1]
    cutoff = len(s1) + len(t1) + 10  # turn 1 fits, turn 2 gets a budget of 10, turn 3 nothing
    s2n, t2n = truncate_lengths(len(s2), len(t2), 10)
    ids, labels = template.encode_sft(tok, messages, None, cutoff)
    assert ids == s1 + t1 + s2[:s2n] + t2[:t2n]
    assert labels == [IGNORE_INDEX] * len(s1) + t1 + [IGNORE_INDEX] * s2n + t2[:t2n]
    row = tokenize_sft({"system": "", "messages": messages}, tokenizer=tok, template=template, cutoff_len=cutoff)
    assert row["truncated"] and row["input_ids"] == ids
    assert row["num_tokens"] == sum(len(s) + len(t) for s, t in pairs)


def test_rows_longer_than_the_tokenizers_maximum_tokenize_quietly(caplog, capfd):
    """kllama cuts rows to cutoff_len itself, so a row past the tokenizer's `model_max_length` prints nothing (the
    seed YAML's run on the GPU machine printed transformers' "Token indices sequence length is longer than the
    specified maximum" line). The same text through a bare `encode` does warn: the check can fail."""
    from kllama.model.tokenizer import build_tokenizer

    text = "hello world " * 1500  # > 2,048 tokens, the written tokenizer's model_max_length
    assert len(build_tokenizer("qwen3_moe").encode(text, add_special_tokens=False)) > 2048
    warned = capfd.readouterr().err + caplog.text
    assert "longer than the specified maximum" in warned

    caplog.clear()
    tok = build_tokenizer("qwen3_moe")
    template = get_template("qwen3", tok)
    prompt, chosen, rejected = template.encode_pair(tok, [{"role": "user", "content": text}], text, "short", None,
                                                    cutoff_len=None)
    assert len(prompt) > 2048 and len(chosen) > 2048
    quiet = capfd.readouterr().err + caplog.text
    assert "longer than the specified maximum" not in quiet
