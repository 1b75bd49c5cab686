"""A small byte-level BPE tokenizer, trained on text we ship, dressed per model family.

Tiny test models need a real tokenizer with the special tokens and chat template of the family they imitate, and
it must work offline. We train one byte-level BPE (vocab ~2048) on `resources/tokenizer_corpus.txt` once per
process; every family shares the same vocabulary and the same ids for the special tokens (they are added first, in
a fixed order), and only differs in bos/eos/pad, whether bos is prepended, and its Jinja chat template.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kllama.errors import KllamaError

VOCAB_SIZE = 2048

# Every token the chat templates below use. The order is part of the contract: ids 0..19 are these, for every arch.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "<think>",
    "</think>",
    "<unk>",
    "<pad>",
)
# Added tokens that still encode to one id but are ordinary text (kept by decode(skip_special_tokens=True)).
NON_SPECIAL_TOKENS: frozenset[str] = frozenset({"<think>", "</think>"})

# Llama 3 style: header blocks, content trimmed, each turn closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# DeepSeek-V2 chat: plain "User: ...\n\nAssistant: ..." turns, the system prompt first, eos closes each answer.
DEEPSEEK_V2_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'Assistant: ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('this chat template knows the roles system, user and assistant, not '"
    " + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

# DeepSeek-V3: system prompts right after bos, then <｜User｜>/<｜Assistant｜> markers, eos closes each answer.
DEEPSEEK_V3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages if message['role'] == 'system' %}{{- message['content'] }}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- elif message['role'] != 'system' %}{{- raise_exception('this chat template knows the roles system, user"
    " and assistant, not ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜>' }}{%- endif %}"
)


def _chatml_template(default_system: str | None, thinking_switch: bool) -> str:
    """ChatML turns; optionally a default system prompt (Qwen1.5/2) or the Qwen3 `enable_thinking=False` switch."""
    head = ""
    if default_system is not None:
        head = (
            "{%- if not messages or messages[0]['role'] != 'system' %}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
            "{%- endif %}"
        )
    think = ""
    if thinking_switch:
        # Qwen3 answers without reasoning when the caller asks for it by pre-filling an empty think block.
        think = "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    return (
        head + "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}" + think + "{%- endif %}"
    )


# Mistral instruct: [INST] ... [/INST] answer</s>; a system prompt is folded into the first user turn.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set turns = messages %}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('this chat template needs turns that alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


@dataclass(frozen=True)
class ChatStyle:
    """What distinguishes one family's tokenizer: its special-token roles, bos prepending, and chat template."""

    bos: str | None  # None: the family has no bos (ChatML models)
    eos: str
    pad: str
    chat_template: str


# pad follows what the real family ships where it ships one (DeepSeek pads with eos, Qwen with <|endoftext|>);
# families that ship none (Llama 3, Mistral, OLMoE's instruct variant here) get the dedicated <pad>.
CHAT_STYLES: dict[str, ChatStyle] = {
    "llama": ChatStyle("<|begin_of_text|>", "<|eot_id|>", "<pad>", LLAMA3_TEMPLATE),
    "deepseek_v2": ChatStyle(
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_V2_TEMPLATE
    ),
    "deepseek_v3": ChatStyle(
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_V3_TEMPLATE
    ),
    "qwen2_moe": ChatStyle(None, "<|im_end|>", "<|endoftext|>", _chatml_template("You are a helpful assistant.", False)),
    "qwen3_moe": ChatStyle(None, "<|im_end|>", "<|endoftext|>", _chatml_template(None, True)),
    "qwen3": ChatStyle(None, "<|im_end|>", "<|endoftext|>", _chatml_template(None, True)),
    "mixtral": ChatStyle("<s>", "</s>", "<pad>", MISTRAL_TEMPLATE),
    # OLMoE-Instruct really uses a Tulu <|user|>/<|assistant|> format; plain ChatML keeps our vocab small.
    "olmoe": ChatStyle(None, "<|im_end|>", "<pad>", _chatml_template(None, False)),
}


def _corpus_text() -> str:
    return resources.files("kllama").joinpath("resources", "tokenizer_corpus.txt").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def base_tokenizer_json() -> str:
    """Train the shared byte-level BPE once per process and return it as tokenizer.json text (deterministic)."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # added first, so they get ids 0..len-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _corpus_text().splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer)
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        # Like Qwen3, reasoning markers stay visible when decoding with skip_special_tokens=True.
        added["special"] = added["content"] not in NON_SPECIAL_TOKENS
    return json.dumps(spec, ensure_ascii=False)


def _post_processor(bos: str | None, bos_id: int | None) -> processors.PostProcessor:
    """Byte-level offsets, plus bos prepended to every sequence when the family has one (as Llama/DeepSeek do)."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None:
        return byte_level
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([byte_level, template])


def build_tokenizer(arch: str = "llama") -> PreTrainedTokenizerFast:
    """Return the shared tiny BPE tokenizer dressed as `arch`'s family: bos/eos/pad, bos prepending, chat template.

    Every arch has the same vocabulary and special-token ids; the trained BPE is cached per process, so repeated
    calls are cheap and identical. Unknown arch -> KllamaError naming the valid ones.
    """
    style = CHAT_STYLES.get(arch)
    if style is None:
        raise KllamaError(f"no tokenizer style for arch {arch!r}; choose one of: {', '.join(CHAT_STYLES)}")
    tok = Tokenizer.from_str(base_tokenizer_json())
    bos_id = tok.token_to_id(style.bos) if style.bos is not None else None
    tok.post_processor = _post_processor(style.bos, bos_id)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=style.bos,
        eos_token=style.eos,
        pad_token=style.pad,
        unk_token="<unk>",
        extra_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in {style.bos, style.eos, style.pad, "<unk>"} | NON_SPECIAL_TOKENS
        ],
        chat_template=style.chat_template,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    return fast
