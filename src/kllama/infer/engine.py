"""The generation engine: one model, a paged KV cache, and decoding steps over any number of answers at once.

We run our own loop instead of `model.generate` so that answers join and leave a running batch between any two
tokens (a new request, a client gone, Ctrl-C), stop strings are matched on the detokenised text, each answer keeps
its own sampling settings, and the same loop serves every backend (stock transformers or the expert engine).
`stream` runs one answer in the caller's thread (`kllama chat`); `kllama api` drives `step` from its scheduler
thread with every running request.

Two paths, chosen per sequence when it starts (`step`): a sequence starting while no other is running goes to the
single stream (single_stream.py: a reused batch-1 static-cache decoder whose steps are CUDA graphs), which is every
turn of `kllama chat` and a lone API request; any other goes to the batch path (batching.py). When a second sequence
arrives while one runs alone, the lone one is moved into the batch at that step boundary by reading its prompt and
answer so far into the paged cache (one prefill), and both are batched from then on. We move it rather than run two
forwards per step (graphed stream + batch) because with CPU experts every forward reads the experts' weights again,
and one packed forward keeps the expert engine placing experts by the step's whole token count. The single stream
is on by default where the model is on CUDA (off on the CPU, where graphs cannot help).
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from kllama.config.loader import KllamaConfig
from kllama.errors import KllamaError
from kllama.infer.batching import DEFAULT_PREFILL_TOKENS, BatchDecoder
from kllama.infer.prompt import Messages, PromptRenderer
from kllama.infer.sampling import SamplingParams
from kllama.infer.sequence import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Emit, Sequence, StreamChunk
from kllama.infer.single_stream import SingleStream
from kllama.model.load import LoadedModel, load_model

__all__ = ["FINISH_CANCELLED", "FINISH_LENGTH", "FINISH_STOP", "Completion", "GenerationEngine", "StreamChunk",
           "build_engine", "sampling_defaults"]


@dataclass
class Completion:
    """A whole answer."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerationEngine:
    """Generates answers with one loaded model; a lock makes each decoding step exclusive (one model, one cache).
    `single_stream`: decode a sequence running alone through the static-cache decoder (None: where the model is on
    CUDA; True on the CPU runs its steps eagerly, for tests)."""

    def __init__(self, loaded: LoadedModel, renderer: PromptRenderer, defaults: SamplingParams,
                 prefill_tokens: int = DEFAULT_PREFILL_TOKENS, single_stream: bool | None = None) -> None:
        self.loaded = loaded
        self.renderer = renderer
        self.defaults = defaults
        self.prefill_tokens = prefill_tokens
        self._lock = threading.Lock()
        # requests, generated_tokens, cancelled, steps, max_batch, max_step_tokens, single_stream (sequences started
        # on the single stream), moved_to_batch (of those, moved into the batch) — shown by the API's /health
        self.stats: Counter[str] = Counter()
        self.decoder = BatchDecoder(loaded.model, loaded.device, self.stats)
        if single_stream is None:
            single_stream = loaded.device.type == "cuda"
        self.single = SingleStream(loaded.model, loaded.context_length, self.stats) if single_stream else None

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

    def new_sequence(self, prompt_ids: list[int], params: SamplingParams, emit: Emit,
                     cancel: threading.Event | None = None) -> Sequence:
        """A sequence answering `prompt_ids` whose chunks go to `emit`; refuses a prompt that fills the context."""
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        if not prompt_ids:
            raise KllamaError("the prompt is empty; send at least one message with text")
        if budget < 1:
            raise KllamaError(f"the prompt has {len(prompt_ids)} tokens, which fills the model's context of "
                              f"{self.context_length}; shorten the conversation (e.g. `clear` the history)")
        return Sequence.start(prompt_ids, params, budget, frozenset(self.renderer.stop_token_ids), self.tokenizer,
                              self.loaded.device, emit, cancel)

    def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """One decoding step of `seqs` (arrival order); returns those that ended. A sequence starting while no other
        is running takes the single stream; another live sequence moves that one into the batch (module docstring)."""
        with self._lock:
            single = self.single
            if single is None:
                return self.decoder.step(seqs, self.prefill_tokens)
            if single.seq is None and len(seqs) == 1 and self._starts_alone(seqs[0]):
                single.admit(seqs[0])
            if single.seq is not None:
                others = [seq for seq in seqs if seq is not single.seq]
                if any(not seq.done for seq in others):
                    seq, cached = single.detach()
                    self.decoder.adopt(seq, cached, self.prefill_tokens)
                elif len(others) < len(seqs):
                    return self.decoder.step(others, self.prefill_tokens) + single.step(self.prefill_tokens)
            return self.decoder.step(seqs, self.prefill_tokens)

    def _starts_alone(self, seq: Sequence) -> bool:
        # Nothing of it fed yet and no batched sequence holding cache (e.g. another `stream` caller's).
        return not seq.done and seq.fed == 0 and not seq.cancel.is_set() and self.decoder.cache.sequences == 0

    def release(self, seq: Sequence) -> None:
        """Free the cache of a sequence abandoned before it ended."""
        with self._lock:
            if self.single is not None:
                self.single.drop(seq)
            self.decoder.cache.free(seq.seq_id)

    def stream(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[StreamChunk]:
        """Yield the answer to `prompt_ids` as text chunks; stops at a turn-end token, a stop string, the token
        budget, the context end, or when `cancel` is set. Steps interleave with other callers' steps."""
        out: list[StreamChunk | BaseException] = []
        seq = self.new_sequence(prompt_ids, params, out.append, cancel)
        self.stats["requests"] += 1
        try:
            while not seq.done:
                self.step([seq])
                for item in out:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                out.clear()
        finally:
            if not seq.done:
                self.release(seq)

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


def build_engine(config: KllamaConfig, device: str = "auto", single_stream: bool | None = None) -> GenerationEngine:
    """Load the model per the config and wrap it in a GenerationEngine with the config's template and sampling
    (`single_stream`: see GenerationEngine)."""
    from kllama.infer.prompt import build_renderer

    loaded = load_model(config, "infer", device=device)
    renderer = build_renderer(config.data.template, loaded.tokenizer, getattr(loaded.model, "generation_config", None),
                              enable_thinking=config.data.enable_thinking, default_system=config.data.default_system)
    return GenerationEngine(loaded, renderer, sampling_defaults(config), single_stream=single_stream)
