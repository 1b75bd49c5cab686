"""Local tokenizer: deterministic training, fixed special-token ids, and each family's chat template."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import jinja2
import pytest
from transformers import AutoTokenizer

from kllama.errors import KllamaError
from kllama.model.tokenizer import CHAT_STYLES, SPECIAL_TOKENS, VOCAB_SIZE, base_tokenizer_json, build_tokenizer
from kllama.model.tiny import TINY_ARCHS

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Italy?"},
]

CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n"
)

# The exact prompt each family's real template would produce for CHAT (+ generation prompt).
EXPECTED = {
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "deepseek_v2": (
        "<｜begin▁of▁sentence｜>Be brief.\n\nUser: Capital of France?\n\nAssistant: Paris.<｜end▁of▁sentence｜>"
        "User: And Italy?\n\nAssistant:"
    ),
    "deepseek_v3": (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Capital of France?<｜Assistant｜>Paris.<｜end▁of▁sentence｜>"
        "<｜User｜>And Italy?<｜Assistant｜>"
    ),
    "qwen2_moe": CHATML,
    "qwen3_moe": CHATML,
    "qwen3": CHATML,
    "olmoe": CHATML,
    "mixtral": "<s>[INST] Be brief.\n\nCapital of France? [/INST] Paris.</s>[INST] And Italy? [/INST]",
}


def test_every_tiny_arch_has_a_style():
    assert set(CHAT_STYLES) == set(TINY_ARCHS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_special_tokens_have_fixed_single_ids(arch):
    tok = build_tokenizer(arch)
    assert len(tok) == VOCAB_SIZE
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == expected_id
        assert tok.encode(token, add_special_tokens=False) == [expected_id]
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chat_template_renders_like_the_family(arch):
    tok = build_tokenizer(arch)
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED[arch]
    ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert tok.decode(ids) == text  # byte-level BPE round-trips exactly
    if tok.bos_token is not None:
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # no doubled bos


def test_qwen_default_system_and_thinking_switch():
    user_only = [{"role": "user", "content": "Hi"}]
    qwen2 = build_tokenizer("qwen2_moe").apply_chat_template(user_only, tokenize=False)
    assert qwen2.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    qwen3 = build_tokenizer("qwen3")
    plain = qwen3.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    no_think = qwen3.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert plain == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert no_think == plain + "<think>\n\n</think>\n\n"


def test_mixtral_rejects_non_alternating_turns():
    tok = build_tokenizer("mixtral")
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)


def test_bos_only_where_the_family_has_one():
    assert build_tokenizer("llama")("Hi").input_ids[0] == build_tokenizer("llama").bos_token_id
    assert build_tokenizer("mixtral")("Hi").input_ids[0] == 12  # <s>
    qwen = build_tokenizer("qwen3_moe")
    assert qwen.bos_token is None and qwen("Hi").input_ids == qwen("Hi", add_special_tokens=False).input_ids


def test_round_trip_and_think_markers_survive_skip_special():
    tok = build_tokenizer("qwen3")
    text = "Café au lait costs €3.50 — 東京 too!\n\tdone"
    assert tok.decode(tok(text).input_ids) == text
    ids = tok("<think>hm</think>Yes<|im_end|>").input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>hm</think>Yes"


def test_saved_tokenizer_loads_offline_identically(tiny_model_dir):
    for arch in ("llama", "deepseek_v3", "qwen3_moe", "mixtral"):
        loaded = AutoTokenizer.from_pretrained(tiny_model_dir(arch), local_files_only=True)
        fresh = build_tokenizer(arch)
        assert loaded.chat_template == fresh.chat_template
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (fresh.bos_token, fresh.eos_token, fresh.pad_token)
        assert loaded.apply_chat_template(CHAT, tokenize=False) == fresh.apply_chat_template(CHAT, tokenize=False)
        assert loaded("Hello there!").input_ids == fresh("Hello there!").input_ids


def test_training_is_deterministic_across_processes():
    here = hashlib.sha256(base_tokenizer_json().encode()).hexdigest()
    code = (
        "import hashlib; from kllama.model.tokenizer import base_tokenizer_json as b;"
        "print(hashlib.sha256(b().encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a different hash seed must not change the merges
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here


def test_unknown_arch_is_a_user_error():
    with pytest.raises(KllamaError, match="llama"):
        build_tokenizer("gpt2")


def test_chat_template_is_stored_in_tokenizer_config(tiny_model_dir):
    import json

    model_dir = tiny_model_dir("deepseek_v2")
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == build_tokenizer("deepseek_v2").chat_template
    assert config["tokenizer_class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")
