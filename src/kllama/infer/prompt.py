"""Render a conversation into prompt ids with the configured chat template, and know which tokens end a turn.

The template is `kllama.data.get_template`'s, the same object training rendered with (`auto` = the tokenizer's
own chat template), so chat and the API see prompts exactly as the adapter was trained on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from transformers import GenerationConfig, PreTrainedTokenizerBase

from kllama.data.templates import get_template

Messages = list[dict[str, str]]


@dataclass
class PromptRenderer:
    """`encode(messages, system) -> ids` ending with the assistant generation prefix, plus the turn-ending ids."""

    name: str
    encode: Callable[[Messages, str | None], list[int]]
    stop_token_ids: list[int]


def build_renderer(
    name: str, tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None, **options: Any
) -> PromptRenderer:
    """The renderer of template `name` ('auto' = the tokenizer's chat template); stop ids are the template's plus
    the model's generation eos. `options` (enable_thinking, default_system) go to `get_template`."""
    template = get_template(name, tokenizer, **options)

    def encode(messages: Messages, system: str | None) -> list[int]:
        return list(template.encode_prompt(tokenizer, messages, system=system))

    eos: Any = generation_config.eos_token_id if generation_config is not None else None
    extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return PromptRenderer(template.name, encode, sorted(set(template.stop_token_ids(tokenizer)) | set(extra)))
