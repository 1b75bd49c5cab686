"""Named templates render exactly like LLaMA-Factory's; expected strings below are written out by hand."""
from __future__ import annotations

import pytest
from data_helpers import make_tokenizer
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from kllama.data import IGNORE_INDEX, get_template
from kllama.errors import KllamaError

SYSTEM = "Be brief."
ONE_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
TWO_TURNS = ONE_TURN + [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]

# name -> (prompt with SYSTEM, response) for ONE_TURN
SINGLE = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "Hello!<|eot_id|>",
    ),
    "deepseek": ("<｜begin▁of▁sentence｜>Be brief.\n\nUser: Hi\n\nAssistant:", "Hello!<｜end▁of▁sentence｜>"),
    "deepseek3": ("<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>", "Hello!<｜end▁of▁sentence｜>"),
    "qwen": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
             "Hello!<|im_end|>\n"),
    "qwen3": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
              "<think>\n\n</think>\n\nHello!<|im_end|>\n"),
    "mistral": ("<s>[INST] Be brief.\n\nHi[/INST]", " Hello!</s>"),
    "empty": ("Be brief.Hi", "Hello!"),
}

# name -> [(source, target), ...] for TWO_TURNS without a system prompt
MULTI = {
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "Hello!<|eot_id|>"),
        ("<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", "4<|eot_id|>"),
    ],
    "deepseek": [("<｜begin▁of▁sentence｜>User: Hi\n\nAssistant:", "Hello!<｜end▁of▁sentence｜>"),
                 ("User: What is 2+2?\n\nAssistant:", "4<｜end▁of▁sentence｜>")],
    "deepseek3": [("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>", "Hello!<｜end▁of▁sentence｜>"),
                  ("<｜User｜>What is 2+2?<｜Assistant｜>", "4<｜end▁of▁sentence｜>")],
    "qwen": [("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello!<|im_end|>\n"),
             ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>\n")],
    "qwen3": [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\nHello!<|im_end|>\n"),
              ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
               "<think>\n\n</think>\n\n4<|im_end|>\n")],
    "mistral": [("<s>[INST] Hi[/INST]", " Hello!</s>"), ("[INST] What is 2+2?[/INST]", " 4</s>")],
    "empty": [("Hi", "Hello!"), ("What is 2+2?", "4")],
}


def _dec(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_turn_pair_strings_and_masks(name, family_tokenizer):
    tok = family_tokenizer(name)
    template = get_template(name, tok)
    prompt, chosen, rejected = template.encode_pair(tok, ONE_TURN[:1], "Hello!", "Go away.", SYSTEM, cutoff_len=None)
    want_prompt, want_response = SINGLE[name]
    assert _dec(tok, prompt) == want_prompt
    assert _dec(tok, chosen) == want_response
    assert _dec(tok, rejected) == want_response.replace("Hello!", "Go away.")
    # The prompt is tokenized slot by slot, exactly like the separate encodes LLaMA-Factory does.
    input_ids, labels = template.encode_sft(tok, ONE_TURN, SYSTEM, cutoff_len=None)
    assert input_ids == prompt + chosen
    assert labels == [IGNORE_INDEX] * len(prompt) + chosen


@pytest.mark.parametrize("name", sorted(MULTI))
def test_multi_turn_sft_strings_and_masks(name, family_tokenizer):
    tok = family_tokenizer(name)
    template = get_template(name, tok)
    input_ids, labels = template.encode_sft(tok, TWO_TURNS, None, cutoff_len=None)
    pairs = template.encode_multiturn(tok, TWO_TURNS, None)
    assert [(_dec(tok, s), _dec(tok, t)) for s, t in pairs] == MULTI[name]
    want_ids, want_labels = [], []
    for s, t in pairs:
        want_ids += s + t
        want_labels += [IGNORE_INDEX] * len(s) + t
    assert input_ids == want_ids and labels == want_labels
    # Both answers are trained, both prompts masked.
    trained = _dec(tok, [i for i, lab in zip(input_ids, labels) if lab != IGNORE_INDEX])
    assert trained == MULTI[name][0][1] + MULTI[name][1][1]


@pytest.mark.parametrize("name", sorted(MULTI))
def test_multi_turn_pair_puts_history_in_the_masked_prompt(name, family_tokenizer):
    tok = family_tokenizer(name)
    template = get_template(name, tok)
    prompt, chosen, _ = template.encode_pair(tok, TWO_TURNS[:3], "4", "five", None, cutoff_len=None)
    (s1, t1), (s2, t2) = MULTI[name]
    if name == "qwen3":  # only the answer being trained gets the empty thought; history keeps none
        t1 = t1.replace("<think>\n\n</think>\n\n", "")
    assert _dec(tok, prompt) == s1 + t1 + s2
    assert _dec(tok, chosen) == t2


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_encode_prompt_ends_with_generation_prefix(name, family_tokenizer):
    tok = family_tokenizer(name)
    template = get_template(name, tok)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    assert _dec(tok, template.encode_prompt(tok, messages)) == SINGLE[name][0]


def test_qwen3_thinking_off_puts_empty_thought_in_prompt(family_tokenizer):
    tok = family_tokenizer("qwen3")
    template = get_template("qwen3", tok, enable_thinking=False)
    prompt, chosen, _ = template.encode_pair(tok, ONE_TURN[:1], "Hello!", "No.", None, cutoff_len=None)
    assert _dec(tok, prompt) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert _dec(tok, chosen) == "Hello!<|im_end|>\n"
    # A real thought is kept (and trained) with thinking on, and stripped with it off.
    thought = "<think>\nadd them\n</think>\n\n4"
    _, with_thought, _ = get_template("qwen3", tok).encode_pair(tok, ONE_TURN[:1], thought, "5", None, None)
    assert _dec(tok, with_thought) == thought + "<|im_end|>\n"
    _, stripped, _ = template.encode_pair(tok, ONE_TURN[:1], thought, "5", None, None)
    assert _dec(tok, stripped) == "4<|im_end|>\n"


def test_qwen_default_system_and_override(family_tokenizer):
    tok = family_tokenizer("qwen")
    prompt = get_template("qwen", tok).encode_prompt(tok, ONE_TURN[:1])
    assert _dec(tok, prompt).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
    custom = get_template("qwen", tok, default_system="Be kind.").encode_prompt(tok, ONE_TURN[:1])
    assert _dec(tok, custom).startswith("<|im_start|>system\nBe kind.<|im_end|>\n")


def test_stop_token_ids(family_tokenizer):
    llama = family_tokenizer("llama3")
    assert get_template("llama3", llama).stop_token_ids(llama) == [llama.convert_tokens_to_ids("<|eot_id|>")]
    ds = family_tokenizer("deepseek")
    assert get_template("deepseek", ds).stop_token_ids(ds) == [ds.eos_token_id]
    qwen = family_tokenizer("qwen", pad="<|endoftext|>")
    assert get_template("qwen", qwen).stop_token_ids(qwen) == [qwen.convert_tokens_to_ids("<|im_end|>")]


def test_bos_is_never_doubled_even_when_encode_adds_one():
    tok = make_tokenizer("<|begin_of_text|>", "<|eot_id|>", add_bos=True)
    assert tok.encode("Hi")[0] == tok.bos_token_id  # the tokenizer itself prepends bos
    ids = get_template("llama3", tok).encode_prompt(tok, ONE_TURN[:1])
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


LLAMA3_JINJA = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_auto_uses_tokenizer_chat_template_and_matches_llama3():
    tok = make_tokenizer("<|begin_of_text|>", "<|eot_id|>", chat_template=LLAMA3_JINJA, add_bos=True)
    auto, named = get_template("auto", tok), get_template("llama3", tok)
    assert auto.encode_pair(tok, TWO_TURNS[:3], "4", "five", SYSTEM, None) == \
        named.encode_pair(tok, TWO_TURNS[:3], "4", "five", SYSTEM, None)
    assert auto.encode_prompt(tok, ONE_TURN[:1]) == named.encode_prompt(tok, ONE_TURN[:1])
    assert auto.encode_sft(tok, TWO_TURNS, None, None) == named.encode_sft(tok, TWO_TURNS, None, None)
    assert auto.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_auto_rejects_templates_that_rewrite_earlier_turns():
    rewriting = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}"
    tok = make_tokenizer("<s>", "</s>", chat_template=rewriting)
    with pytest.raises(KllamaError, match="append-only"):
        get_template("auto", tok).encode_sft(tok, TWO_TURNS, None, None)


def test_template_errors(family_tokenizer):
    tok = family_tokenizer("deepseek")
    with pytest.raises(KllamaError, match="unknown template 'llama2'.*llama3.*qwen3"):
        get_template("llama2", tok)
    with pytest.raises(KllamaError, match="has none"):
        get_template("auto", tok)
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hi": 3}
    no_eot = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                     bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(KllamaError, match="<\\|eot_id\\|>"):
        get_template("llama3", no_eot)


def test_missing_pad_becomes_eos(family_tokenizer):
    tok = family_tokenizer("deepseek", pad=None)
    assert tok.pad_token_id is None
    get_template("deepseek", tok)
    assert tok.pad_token_id == tok.eos_token_id
