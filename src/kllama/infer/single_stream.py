"""One answer decoded alone through the static-cache decoder of `graphs.py`: CUDA graphs for `kllama chat` and a
lone `kllama api` request.

The batch path (batching.py) packs every running answer into one forward over a paged cache; that forward cannot be
captured, and at batch 1 on a GPU its thousands of kernel launches cap decode near 10 tok/s where the graphed decoder
replays a step at 100+ (benchmarks/NOTES.md, decode). So the engine hands a sequence that starts while no other is
running to a `SingleStream`: slot 0 of a batch-1 `GraphedDecoder`, the prompt read eagerly in chunks of the engine's
prefill size, then one replayed step per token. Sampling runs on the step's logits outside the graph with the same
`sample_rows` and `Sequence.accept` as the batch path, so settings, seeds, stop strings and budgets behave alike.

The decoder is built on the first such sequence and reused by every later one (its graphs are captured once per
model load); it is rebuilt only for a sequence needing more positions than it has (prompt + answer budget, rounded
up to a power of two, at most the model's context). Without CUDA it runs its steps eagerly over the same cache.

If another sequence shows up while the stream runs, the engine moves the stream into the batch path: `detach` hands
back the ids in its cache and the batch decoder reads them into the paged cache (one prefill), and from then on the
sequence is batched like the others until it ends.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from kllama.infer.batching import accept_tokens, count_step
from kllama.infer.graphs import GraphedDecoder, graphed_decoder
from kllama.infer.sampling import sample_rows
from kllama.infer.sequence import Sequence

logger = logging.getLogger(__name__)

MIN_STATIC_LEN = 256  # smallest decoder built: short requests share one decoder instead of rebuilding per size


def static_length(needed: int, context_length: int) -> int:
    """Positions of a decoder built for a sequence needing `needed` (prompt + budget): the next power of two of at
    least MIN_STATIC_LEN, at most the model's context (a longer sequence cannot be admitted anyway)."""
    size = MIN_STATIC_LEN
    while size < needed:
        size *= 2
    return max(needed, min(size, context_length))


class SingleStream:
    """Decodes one sequence at a time through a reused batch-1 `GraphedDecoder` (see the module docstring)."""

    def __init__(self, model: nn.Module, context_length: int, stats: Counter[str], use_graphs: bool = True) -> None:
        self.model = model
        self.context_length = context_length
        self.stats = stats
        self.use_graphs = use_graphs
        self.seq: Sequence | None = None  # the sequence being decoded, None while the slot is free
        self.decoder: GraphedDecoder | None = None
        self.unavailable = False  # the model's attention takes no static-cache mask: never admit
        self._cached: list[int] = []  # ids in the decoder's slot 0, position by position

    def admit(self, seq: Sequence) -> bool:
        """Start decoding `seq` (nothing of it fed yet) here; False when this model cannot (the batch path serves)."""
        if self.unavailable or self.seq is not None:
            return False
        needed = seq.prompt_tokens + seq.budget
        if self.decoder is None or self.decoder.max_len < needed:
            use_graphs = self.use_graphs and (self.decoder is None or self.decoder.graphed)  # a failed capture stays
            self.decoder = None  # the old cache and graphs go before the new ones are made
            self.decoder = graphed_decoder(self.model, 1, static_length(needed, self.context_length),
                                           use_graphs=use_graphs)
            if self.decoder is None:
                self.unavailable = True
                return False
        self.seq, self._cached = seq, []
        self.stats["single_stream"] += 1
        return True

    def detach(self) -> tuple[Sequence, list[int]]:
        """Give up the running sequence: it and the ids its cache holds (for the batch path to read them)."""
        seq, cached = self.seq, self._cached
        if seq is None:
            raise RuntimeError("no sequence is running on the single stream")
        self.seq, self._cached = None, []
        self.stats["moved_to_batch"] += 1
        return seq, cached

    def drop(self, seq: Sequence) -> None:
        """Forget `seq` if it is the running one (abandoned by its caller before it ended)."""
        if self.seq is seq:
            self.seq, self._cached = None, []

    def step(self, prefill_tokens: int) -> list[Sequence]:
        """Advance the running sequence by one forward (a prompt chunk of up to `prefill_tokens`, or one token);
        returns it once it has ended (finished, cancelled or failed), which frees the slot."""
        seq = self.seq
        if seq is None:
            return []
        if seq.cancel.is_set():
            seq.cancelled()
            self.stats["cancelled"] += 1
            self.seq = None
            return [seq]
        start = len(self._cached)
        taken = seq.take(prefill_tokens if seq.prefilling else 1)
        try:
            with torch.inference_mode():
                if start >= seq.prompt_tokens:  # one answer token: the replayed step
                    logits = self.decoder.step(taken, [start])  # [1, V]
                else:
                    logits = self.decoder.prefill(taken, 0, start)[None]  # [1, V]
                self._cached.extend(taken)
                count_step(self.stats, 1, len(taken))
                if seq.pending:  # more of the prompt to read
                    return []
                tokens, finite = sample_rows(logits, [seq.sampler])
        except Exception as exc:  # noqa: BLE001 - as in the batch path: the sequence gets the error, the engine serves on
            logger.exception("single-stream step failed (sequence %d, %d tokens)", seq.seq_id, len(taken))
            seq.fail(exc)
            self.seq = None
            return [seq]
        ended = accept_tokens([seq], tokens, finite, self.stats)
        if ended:
            self.seq = None
        return ended
