"""The engine's warm-up: one short answer read and decoded at build, so no user request pays a process's first-use
costs.

The decode step of every batch bucket is captured as a CUDA graph when the engine is built (graphs.py), but the
prompt is read by packed eager steps that nothing has run yet: the first request of a process would pay for the
first prefill's lazy CUDA work (kernel modules loaded on first use, cuBLAS handles and workspaces, Triton kernels
compiled or loaded, the caching allocator growing, the expert engine's first GPU grouped GEMMs, ...): 1.6-1.8 s to
the first token of a 19-token prompt on an H200 with DeepSeek-V2-Lite, against 0.11 s once a request has run.
`warm_up` runs a real request's path instead: `new_sequence` on a rendered prompt, then `step` until it has read the
prompt (one packed step) and answered one more token (one decode step), then the sequence ends and frees its slot.

It is no request: its steps count into a scratch counter, not the engine's `stats` (what /health reports), and it
samples with a seeded generator of its own, so the global RNG draws what it would have drawn without it. Its cache
rows stay written; a later sequence in that slot writes every position before it reads it, as after any answer.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

from kllama.infer.sequence import StreamChunk

if TYPE_CHECKING:
    from kllama.infer.engine import GenerationEngine

logger = logging.getLogger(__name__)

WARMUP_TEXT = ("Warm-up before the first request: in two sentences, say what the experts of a mixture-of-experts "
               "language model compute and how the router picks them for each token.")
WARMUP_PROMPT_TOKENS = 32  # at most; the tail of the rendered prompt, so it ends with the assistant prefix
WARMUP_ANSWER_TOKENS = 2  # the first from the prompt's packed step, the second from one decode step


def warm_up(engine: GenerationEngine) -> Counter[str]:
    """Answer a fixed short prompt with WARMUP_ANSWER_TOKENS tokens through `engine.new_sequence` and
    `engine.step` (the path of `kllama chat` and `kllama api`), under the engine's default sampling settings with
    a seed of its own; returns the steps it ran (`packed_steps`, `decode_steps`, ...), which the engine's `stats`
    never see. An error of its steps is logged, not raised: a request would meet it again and report it."""
    room = engine.context_length - WARMUP_ANSWER_TOKENS
    if room < 1:
        logger.info("no warm-up: a sequence holds only %d tokens", engine.context_length)
        return Counter()
    prompt = engine.encode([{"role": "user", "content": WARMUP_TEXT}])[-min(WARMUP_PROMPT_TOKENS, room):]
    params = replace(engine.defaults, max_new_tokens=WARMUP_ANSWER_TOKENS, stop=(), seed=0, ignore_eos=True)
    out: list[StreamChunk | BaseException] = []
    seq = engine.new_sequence(prompt, params, out.append)
    steps: Counter[str] = Counter()
    counted, engine.batch.stats = engine.batch.stats, steps
    try:
        while not seq.done:
            engine.step([seq])
    finally:
        engine.batch.stats = counted
        engine.release(seq)  # a no-op once it ended; frees the slot if a step raised past it
    failed = [item for item in out if isinstance(item, BaseException)]
    if failed:
        logger.warning("the warm-up answer failed (%s: %s); the first request may be slow or fail alike",
                       type(failed[0]).__name__, failed[0])
    return steps
