"""Helpers for the data tests: a small byte-level BPE tokenizer (trained once) dressed as different families."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>",
    "</s>", "[INST]", "[/INST]", "<think>", "</think>", "<unk>", "<pad>",
]
CORPUS = [
    "Hello there, how are you today? I am fine, thank you.",
    "What is the capital of France? Paris is the capital of France.",
    "User: Assistant: system user assistant You are a helpful assistant.",
    "Sure! The answer is simple. Look it up yourself. Not my problem.",
] * 20


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def make_tokenizer(bos: str | None, eos: str, pad: str | None = "<pad>", chat_template: str | None = None,
                   specials: list[str] | None = None, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A fresh tokenizer with the given bos/eos/pad roles (same vocab every time); `add_bos` makes plain
    `encode` prepend bos, as Llama/DeepSeek tokenizers do."""
    tok = Tokenizer.from_str(_bpe_json())
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>",
        additional_special_tokens=[t for t in (specials or SPECIALS) if t not in {bos, eos, pad, "<unk>"}],
        chat_template=chat_template, clean_up_tokenization_spaces=False,
    )


# Family-like tokenizers for each named template.
FAMILY = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "qwen": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "mistral": ("<s>", "</s>"),
    "empty": ("<s>", "</s>"),
}



def write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
