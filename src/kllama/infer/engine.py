"""The generation engine: one model, a slot KV cache, and decoding steps over any number of answers at once.

We run our own loop instead of `model.generate` so that answers join and leave a running batch between any two
tokens (a new request, a client gone, Ctrl-C), stop strings are matched on the detokenised text, each answer keeps
its own sampling settings, and the same loop serves every backend (stock transformers or the expert engine).
`stream` runs one answer in the caller's thread (`kllama chat`); `kllama api` drives `step` from its scheduler
thread with every running request.

There is one path: a `SlotBatch` (batching.py) over one `GraphedDecoder` (graphs.py) of `max_batch` slots x
`max_len` positions, made when the engine is built: its KV memory is allocated then (`kv_cache_bytes`) and, on a GPU,
the decode step of every batch bucket is captured for answers of up to MIN_READ tokens (`capture_s`; longer reads
are captured on first use). Decode steps are CUDA graphs on a GPU and eager elsewhere; prompts are read by packed
eager steps. On a GPU the build ends with a warm-up answer (warmup.py: one prompt read, one decode step; `warmup_s`)
so the first request does not pay the process's first prefill. `kllama chat` uses one slot, `kllama api`
`API_MAX_BATCH`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch

from kllama.config.loader import KllamaConfig
from kllama.config.units import parse_bytes
from kllama.errors import KllamaError
from kllama.infer.batching import DEFAULT_PREFILL_TOKENS, SlotBatch
from kllama.infer.graphs import GraphedDecoder
from kllama.infer.kv_budget import fitted_positions, gpu_room_bytes
from kllama.infer.kv_cache import BOOL_MASK_ATTENTION, transformers_model
from kllama.infer.prompt import Messages, PromptRenderer
from kllama.infer.sampling import SamplingParams
from kllama.infer.sequence import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Emit, Sequence, StreamChunk
from kllama.infer.warmup import warm_up as run_warm_up
from kllama.model.engine_setup import fill_gpu_memory
from kllama.model.load import LoadedModel, load_model

__all__ = ["FINISH_CANCELLED", "FINISH_LENGTH", "FINISH_STOP", "Completion", "GenerationEngine", "StreamChunk",
           "build_engine", "sampling_defaults"]

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """A whole answer."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class GenerationEngine:
    """Generates answers with one loaded model; a lock makes each decoding step exclusive (one model, one cache).
    `max_batch` sequences decode together (one cache slot each) and each may hold `max_len` tokens of prompt and
    answer (None or more than the model's context: the model's context); `use_graphs=False` keeps steps eager;
    `warm_up` runs one short answer at the end of the build (None: on a CUDA device only, where the first prefill's
    one-time costs are large; CPU start-up stays fast)."""

    def __init__(self, loaded: LoadedModel, renderer: PromptRenderer, defaults: SamplingParams,
                 prefill_tokens: int = DEFAULT_PREFILL_TOKENS, *, max_batch: int = 1, max_len: int | None = None,
                 use_graphs: bool = True, gpu_memory_utilization: float = 0.0, warm_up: bool | None = None,
                 compile_steps: bool = False) -> None:
        self.loaded = loaded
        self.renderer = renderer
        self.defaults = defaults
        self.prefill_tokens = prefill_tokens
        self._lock = threading.Lock()
        # requests, generated_tokens, cancelled, steps (decode_steps + packed_steps), max_batch, max_step_tokens —
        # shown by the API's /health
        self.stats: Counter[str] = Counter()
        use_mask_attention(loaded.model)
        positions = min(max_len or loaded.context_length, loaded.context_length)
        self.decoder = GraphedDecoder(loaded.model, max_batch, positions, use_graphs=use_graphs,
                                      compile_steps=compile_steps)
        self.kv_cache_bytes = allocate_kv_cache(self.decoder)
        self.filled_layers = fill_gpu(loaded, gpu_memory_utilization)  # before the graphs capture the layers' targets
        self.capture_s = self.decoder.capture_buckets()
        self.batch = SlotBatch(self.decoder, self.stats)
        self.warmup_s: float | None = None  # seconds of the warm-up answer; None when none ran
        self.warmup_steps: Counter[str] = Counter()  # its steps, kept out of `stats`
        if warm_up is None:
            warm_up = loaded.device.type == "cuda"
        if warm_up:
            began = time.perf_counter()
            self.warmup_steps = run_warm_up(self)
            self.warmup_s = time.perf_counter() - began

    @property
    def compile_note(self) -> str | None:
        """What `decode_compile` did, for the start-up line (None when it was not asked for)."""
        decoder = self.decoder
        if decoder.compile_reason == "not asked for":
            return None
        if decoder.compiled is not None:
            return f"one-sequence decode steps compiled (torch.compile, {len(decoder.compiled.modules)} modules)"
        return f"decode steps not compiled: {decoder.compile_reason}"

    @property
    def tokenizer(self):  # noqa: ANN201 - a transformers tokenizer
        return self.loaded.tokenizer

    @property
    def max_batch(self) -> int:
        """Sequences that can decode together (cache slots)."""
        return self.decoder.max_batch

    @property
    def context_length(self) -> int:
        """Max prompt + answer tokens of one sequence (a cache slot's positions)."""
        return self.decoder.max_len

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
            raise KllamaError(f"the prompt has {len(prompt_ids)} tokens, which fills the context of "
                              f"{self.context_length} tokens (kt_maxlen, at most the model's); shorten the conversation "
                              "(e.g. `clear` the history) or raise kt_maxlen")
        return Sequence.start(prompt_ids, params, budget, frozenset(self.renderer.stop_token_ids), self.tokenizer,
                              self.loaded.device, emit, cancel)

    def step(self, seqs: list[Sequence]) -> list[Sequence]:
        """One decoding step of `seqs` (arrival order); returns those that ended (module docstring)."""
        with self._lock:
            return self.batch.step(seqs, self.prefill_tokens)

    def release(self, seq: Sequence) -> None:
        """Free the cache slot of a sequence abandoned before it ended."""
        with self._lock:
            self.batch.release(seq)

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


def use_mask_attention(model: torch.nn.Module) -> None:
    """Switch a model whose attention takes no custom 4-D mask (flash-attention kernels) to sdpa, with a warning:
    the slot cache hands every attention an explicit mask."""
    hf = transformers_model(model)
    attention = hf.config._attn_implementation
    if attention not in BOOL_MASK_ATTENTION:
        logger.warning("attention %r takes no custom mask; kllama's decoder switches the model to sdpa", attention)
        hf.set_attn_implementation("sdpa")


def fill_gpu(loaded: LoadedModel, utilization: float) -> list[str]:
    """Keep `auto` layers' experts resident in the GPU memory the KV cache left (`gpu_memory_utilization`), with one
    line saying how many; the names of the layers made resident."""
    if loaded.engine is None or utilization <= 0:
        return []
    filled = fill_gpu_memory(loaded.engine, loaded.device, utilization)
    if filled:
        total = len(loaded.engine.modules)
        resident = sum(m.placement.mode == "gpu" for m in loaded.engine.modules.values())
        gb = torch.cuda.get_device_properties(loaded.device).total_memory / 1e9
        print(f"GPU memory: {len(filled)} more MoE layers keep their experts resident ({resident} of {total} now; "
              f"gpu_memory_utilization {utilization:g} of {gb:.0f} GB, after the KV cache); "
              f"gpu_memory_utilization: 0 keeps them in host RAM", flush=True)
    return filled


def allocate_kv_cache(decoder: GraphedDecoder) -> int:
    """Allocate the decoder's cache now (not at the first request) and return its bytes; running out of GPU memory
    is one error naming the settings that size it."""
    try:
        return decoder.allocate()
    except torch.OutOfMemoryError:
        raise KllamaError(f"the KV cache of {decoder.max_batch} sequences x {decoder.max_len} tokens does not fit in "
                          "the GPU memory the model's weights leave (and under max_gpu_memory, if set); lower kt_maxlen "
                          "(tokens per sequence) or API_MAX_BATCH (sequences decoded together)") from None


def build_engine(config: KllamaConfig, device: str = "auto", max_batch: int = 1,
                 warm_up: bool | None = None) -> GenerationEngine:
    """Load the model per the config and wrap it in a GenerationEngine with the config's template, sampling and
    `kt_maxlen` tokens per sequence (left at its default on a GPU: lowered to fit, see kv_budget.py), decoding up to
    `max_batch` sequences together; `warm_up` as GenerationEngine's (None: on a GPU)."""
    from kllama.infer.prompt import build_renderer

    loaded = load_model(config, "infer", device=device)
    positions = min(config.generation.kt_maxlen, loaded.context_length)
    if "kt_maxlen" not in config.given and loaded.device.type == "cuda":
        cap = parse_bytes(config.engine.max_gpu_memory) if config.engine.max_gpu_memory else None
        positions = fitted_positions(loaded, max_batch, positions, gpu_room_bytes(loaded.device, cap))
    renderer = build_renderer(config.data.template, loaded.tokenizer, getattr(loaded.model, "generation_config", None),
                              enable_thinking=config.data.enable_thinking, default_system=config.data.default_system)
    return GenerationEngine(loaded, renderer, sampling_defaults(config), max_batch=max_batch, max_len=positions,
                            gpu_memory_utilization=fill_fraction(config), warm_up=warm_up,
                            compile_steps=config.engine.decode_compile)


def fill_fraction(config: KllamaConfig) -> float:
    """The `gpu_memory_utilization` an inference engine fills with resident experts: none under `max_gpu_memory`
    (its layers were promoted within the cap at load)."""
    return 0.0 if config.engine.max_gpu_memory else config.engine.gpu_memory_utilization
