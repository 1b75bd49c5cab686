"""The generation engine: one model, a KV-cached decoding loop that streams text, one request at a time.

We run our own loop (prefill once, then one token per forward with `past_key_values`) instead of `model.generate`
so that a caller can stop it between any two tokens (client gone, Ctrl-C), stop strings are matched on the
detokenised text, and the same loop serves every backend (stock transformers or the expert engine).
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.infer.prompt import Messages, PromptRenderer
from kllama.infer.sampling import SamplingParams, build_logits_processor, make_generator, select_next_tokens
from kllama.infer.text_stream import IncrementalDecoder, StopStringMatcher
from kllama.model.load import LoadedModel, load_model

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass
class StreamChunk:
    """A piece of answer text; the last chunk of an answer carries its finish_reason and token count."""

    text: str
    finish_reason: str | None = None  # stop | length | cancelled
    completion_tokens: int = 0


@dataclass
class Completion:
    """A whole answer."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerationEngine:
    """Generates answers with one loaded model; a lock serialises callers (the model and its cache are not shared)."""

    def __init__(self, loaded: LoadedModel, renderer: PromptRenderer, defaults: SamplingParams) -> None:
        self.loaded = loaded
        self.renderer = renderer
        self.defaults = defaults
        self._lock = threading.Lock()
        self.stats: Counter[str] = Counter()  # requests, generated_tokens, cancelled (shown by the API's /health)

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        """Max prompt + answer tokens."""
        return self.loaded.context_length

    def encode(self, messages: Messages, system: str | None = None) -> list[int]:
        """Prompt ids of a conversation (ending with the assistant prefix) under the configured template."""
        return self.renderer.encode(messages, system)

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[StreamChunk]:
        """Yield the answer to `prompt_ids` as text chunks; stops at a turn-end token, a stop string, the token
        budget, the context end, or when `cancel` is set. Waits for the engine while another answer runs."""
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        if budget < 1:
            raise KllamaError(f"the prompt has {len(prompt_ids)} tokens, which fills the model's context of "
                              f"{self.context_length}; shorten the conversation (e.g. `clear` the history)")
        with self._lock, torch.inference_mode():
            self.stats["requests"] += 1
            yield from self._decode(prompt_ids, params, budget, cancel)

    def _decode(
        self, prompt_ids: list[int], params: SamplingParams, budget: int, cancel: threading.Event | None
    ) -> Iterator[StreamChunk]:
        model, device = self.loaded.model, self.loaded.device
        processors = build_logits_processor(params)
        generator = make_generator(params, device)
        end_ids = set() if params.ignore_eos else set(self.renderer.stop_token_ids)
        decoder, matcher = IncrementalDecoder(self.tokenizer), StopStringMatcher(params.stop)
        seen = torch.tensor([prompt_ids], device=device)  # [1, T] prompt + answer so far (repetition penalty)
        step_input, cache, produced = seen, None, 0
        while True:
            if cancel is not None and cancel.is_set():
                self.stats["cancelled"] += 1
                yield StreamChunk("", FINISH_CANCELLED, produced)
                return
            out = model(input_ids=step_input, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            token = select_next_tokens(out.logits[:, -1, :], seen, params, processors, generator)  # [1]
            token_id = int(token.item())
            if token_id in end_ids:
                yield StreamChunk(matcher.flush(), FINISH_STOP, produced)
                return
            produced += 1
            self.stats["generated_tokens"] += 1
            text = matcher.feed(decoder.push(token_id))
            if matcher.stopped:
                yield StreamChunk(text, FINISH_STOP, produced)
                return
            if produced >= budget:
                yield StreamChunk(text + matcher.flush(), FINISH_LENGTH, produced)
                return
            if text:
                yield StreamChunk(text)
            step_input = token.view(1, 1)  # [1, 1]
            seen = torch.cat([seen, step_input], dim=1)

    def complete(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None) -> Completion:
        """The whole answer at once (same loop as `stream`)."""
        parts, last = [], StreamChunk("", FINISH_STOP)
        for chunk in self.stream(prompt_ids, params, cancel):
            parts.append(chunk.text)
            last = chunk
        return Completion("".join(parts), last.finish_reason or FINISH_STOP, len(prompt_ids), last.completion_tokens)


def sampling_defaults(config: KllamaConfig) -> SamplingParams:
    """The config's `generation` section as SamplingParams (what chat uses and what API requests default to)."""
    g = config.generation
    return SamplingParams(
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        do_sample=g.do_sample,
        stop=tuple(g.stop or ()),
    )


def build_engine(config: KllamaConfig, device: str = "auto") -> GenerationEngine:
    """Load the model per the config and wrap it in a GenerationEngine with the config's template and sampling."""
    from kllama.infer.prompt import build_renderer

    loaded = load_model(config, "infer", device=device)
    renderer = build_renderer(config.data.template, loaded.tokenizer, getattr(loaded.model, "generation_config", None),
                              enable_thinking=config.data.enable_thinking, default_system=config.data.default_system)
    return GenerationEngine(loaded, renderer, sampling_defaults(config))
