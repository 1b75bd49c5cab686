"""One answer being generated: the tokens still to feed, its sampler, its text stream and when it ends.

A `Sequence` knows nothing of batching: the batch step feeds it (`take`), hands it the token chosen for it
(`accept`), and the sequence turns tokens into text chunks for its `emit` callback, holding back what could be the
start of a stop string, until a turn-end token, a stop string, its token budget, cancellation or an error ends it.
The first answer token always emits a chunk, even an empty one (a token whose text is still partial, or a special
token): the API sends its first event then, so time to first token is what a client measures.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from kllama.infer.sampling import RowSampler, SamplingParams, build_logits_processor, make_generator
from kllama.infer.text_stream import IncrementalDecoder, StopStringMatcher

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"

_ids = itertools.count()


@dataclass
class StreamChunk:
    """A piece of answer text; the last chunk of an answer carries its finish_reason and token count."""

    text: str
    finish_reason: str | None = None  # stop | length | cancelled
    completion_tokens: int = 0


Emit = Callable[[StreamChunk | BaseException], None]


@dataclass(eq=False)
class Sequence:
    """The decoding state of one answer. Build it with `Sequence.start`."""

    prompt_tokens: int
    budget: int  # max answer tokens
    end_ids: frozenset[int]
    sampler: RowSampler
    decoder: IncrementalDecoder
    matcher: StopStringMatcher
    emit: Emit
    cancel: threading.Event
    pending: list[int]  # tokens to feed: the prompt's uncached part, then the last token chosen
    seq_id: int = field(default_factory=lambda: next(_ids))
    fed: int = 0  # tokens handed to the model so far
    produced: int = 0
    done: bool = False

    @classmethod
    def start(cls, prompt_ids: list[int], params: SamplingParams, budget: int, end_ids: frozenset[int],
              tokenizer: object, device: torch.device, emit: Emit, cancel: threading.Event | None = None
              ) -> "Sequence":
        """A sequence that will answer `prompt_ids` with at most `budget` tokens, streaming chunks to `emit`."""
        # The repetition penalty reads every id seen so far; without it the seen ids are never looked at.
        seen = torch.tensor([prompt_ids], device=device) if params.repetition_penalty != 1.0 else \
            torch.empty((1, 0), dtype=torch.long, device=device)
        sampler = RowSampler(params, build_logits_processor(params), make_generator(params, device), seen)
        return cls(len(prompt_ids), budget, frozenset() if params.ignore_eos else end_ids, sampler,
                   IncrementalDecoder(tokenizer), StopStringMatcher(params.stop), emit,
                   cancel if cancel is not None else threading.Event(), list(prompt_ids))

    @property
    def prefilling(self) -> bool:
        """True while part of the prompt has not been fed yet."""
        return self.fed < self.prompt_tokens

    def take(self, limit: int) -> list[int]:
        """Remove and return up to `limit` tokens to feed this step."""
        taken, self.pending = self.pending[:limit], self.pending[limit:]
        self.fed += len(taken)
        return taken

    def accept(self, token_id: int) -> None:
        """The token chosen after everything fed so far: stream its text, or end the answer."""
        if token_id in self.end_ids:
            self._finish(StreamChunk(self.matcher.flush(), FINISH_STOP, self.produced))
            return
        self.produced += 1
        text = self.matcher.feed(self.decoder.push(token_id))
        if self.matcher.stopped:
            self._finish(StreamChunk(text, FINISH_STOP, self.produced))
        elif self.produced >= self.budget:
            self._finish(StreamChunk(text + self.matcher.flush(), FINISH_LENGTH, self.produced))
        else:
            if text or self.produced == 1:  # the first token always shows: a client sees when its answer began
                self.emit(StreamChunk(text))
            self.pending = [token_id]
            if self.sampler.params.repetition_penalty != 1.0:
                seen = self.sampler.seen_ids
                self.sampler.seen_ids = torch.cat([seen, seen.new_tensor([[token_id]])], dim=1)

    def cancelled(self) -> None:
        """End the answer because its client left (what was streamed stays streamed)."""
        self._finish(StreamChunk("", FINISH_CANCELLED, self.produced))

    def fail(self, error: BaseException) -> None:
        """End the answer with an error the caller turns into its reply."""
        if not self.done:
            self.done = True
            self.emit(error)

    def _finish(self, chunk: StreamChunk) -> None:
        self.done = True
        self.emit(chunk)
