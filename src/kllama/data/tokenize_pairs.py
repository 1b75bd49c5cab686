"""Canonical examples -> token ids and labels, with truncation bookkeeping for the summary.

Preference rows become full sequences (prompt + response) for both answers, labels -100 over the shared prompt;
SFT rows become one sequence with every assistant turn trained. `num_tokens` is the untruncated length
(the longer answer for pairs) and `truncated` whether `cutoff_len` cut anything; the loader turns both into the
summary and drops them from the training rows.
"""
from __future__ import annotations

from kllama.data.templates import IGNORE_INDEX, Template, truncate_lengths


def tokenize_pair(example: dict, *, tokenizer, template: Template, cutoff_len: int) -> dict:
    """One canonical preference example -> chosen/rejected input ids and labels (prompt masked with -100)."""
    system = example["system"] or None
    prompt, chosen, rejected = template.encode_pair(
        tokenizer, example["prompt"], example["chosen"], example["rejected"], system, cutoff_len=None
    )
    target = max(len(chosen), len(rejected))
    full = len(prompt) + target
    src, tgt = truncate_lengths(len(prompt), target, cutoff_len)
    truncated = src < len(prompt) or tgt < target
    prompt, chosen, rejected = prompt[:src], chosen[:tgt], rejected[:tgt]
    masked = [IGNORE_INDEX] * len(prompt)
    return {
        "chosen_input_ids": prompt + chosen,
        "chosen_labels": masked + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_labels": masked + rejected,
        "num_tokens": full,
        "truncated": truncated,
    }


def tokenize_sft(example: dict, *, tokenizer, template: Template, cutoff_len: int) -> dict:
    """One canonical SFT example -> input ids and labels (every assistant turn trained, prompts masked)."""
    system = example["system"] or None
    full = sum(len(s) + len(t) for s, t in template.encode_multiturn(tokenizer, example["messages"], system))
    input_ids, labels = template.encode_sft(tokenizer, example["messages"], system, cutoff_len)
    return {"input_ids": input_ids, "labels": labels, "num_tokens": full, "truncated": len(input_ids) < full}


def has_response(row: dict) -> bool:
    """False when truncation left no trained token (the row would teach nothing)."""
    if "chosen_labels" in row:
        return any(t != IGNORE_INDEX for t in row["chosen_labels"]) and any(t != IGNORE_INDEX for t in row["rejected_labels"])
    return any(t != IGNORE_INDEX for t in row["labels"])


TOKENIZERS = {"dpo": tokenize_pair, "sft": tokenize_sft}
