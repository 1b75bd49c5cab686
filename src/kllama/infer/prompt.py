"""Render a conversation into prompt ids with the configured chat template, and know which tokens end a turn.

kllama's template registry (`kllama.data.get_template`) is the source of truth: it renders exactly what training
rendered. While a name is unknown to it (or the registry is absent), we fall back to the tokenizer's own Jinja
chat template, which is what `template: auto` means.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from transformers import GenerationConfig, PreTrainedTokenizerBase

from kllama.errors import KllamaError

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class PromptRenderer:
    """`encode(messages, system) -> ids` ending with the assistant generation prefix, plus the turn-ending ids."""

    name: str
    encode: Callable[[Messages, str | None], list[int]]
    stop_token_ids: list[int]


def _tokenizer_template_renderer(tokenizer: PreTrainedTokenizerBase) -> PromptRenderer:
    if not getattr(tokenizer, "chat_template", None):
        raise KllamaError(
            "the tokenizer has no chat_template and no kllama template was found; set `template:` to one of kllama's "
            "templates (llama3, deepseek, deepseek3, qwen, qwen3, mistral, empty)"
        )

    def encode(messages: Messages, system: str | None) -> list[int]:
        if system and not (messages and messages[0]["role"] == "system"):
            messages = [{"role": "system", "content": system}, *messages]
        try:
            ids: Any = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja's raise_exception (e.g. a role the template does not know)
            raise KllamaError(f"the tokenizer's chat template rejected the conversation: {exc}") from None
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    eos = tokenizer.eos_token_id
    return PromptRenderer("auto", encode, [eos] if eos is not None else [])


def _find_get_template() -> Callable[..., Any] | None:
    for module in ("kllama.data", "kllama.data.templates"):
        try:
            return getattr(importlib.import_module(module), "get_template")
        except (ImportError, AttributeError):
            continue
    return None


def _registry_renderer(name: str, tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]) -> PromptRenderer | None:
    get_template = _find_get_template()
    if get_template is None:
        return None
    template = get_template(name, tokenizer, **options)

    def encode(messages: Messages, system: str | None) -> list[int]:
        return list(template.encode_prompt(tokenizer, messages, system=system))

    return PromptRenderer(name, encode, list(template.stop_token_ids(tokenizer)))


def build_renderer(
    name: str, tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None, **options: Any
) -> PromptRenderer:
    """The renderer for template `name` ('auto' = the tokenizer's chat template); stop ids include the model's eos.
    `options` (enable_thinking, default_system) go to kllama's template registry."""
    renderer = _registry_renderer(name, tokenizer, options)
    if renderer is None:
        if name != "auto":
            logger.warning("kllama's template registry is not available; rendering with the tokenizer's own chat "
                           "template instead of %r", name)
        renderer = _tokenizer_template_renderer(tokenizer)
    eos: Any = generation_config.eos_token_id if generation_config is not None else None
    extra = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    renderer.stop_token_ids = sorted(set(renderer.stop_token_ids) | set(extra))
    return renderer
