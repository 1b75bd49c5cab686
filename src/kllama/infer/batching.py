"""Continuous batching over the slot decoder: sequences join and leave one running batch between any two tokens.

Each running sequence owns a slot of the decoder's cache (graphs.py, kv_cache.py); slots 0..n-1 are always the
occupied ones (a sequence that ends hands its slot to the last one, whose cache moves down). A step is one of two
kinds, chosen by what the step's sequences need:

* **decode step** — every one of them is answering: one token per slot through `GraphedDecoder.step`, replayed as
  a CUDA graph on a GPU (a batch of 1 is bucket 1: `kllama chat` and a lone API request run the same code);
* **packed step** — some are still reading their prompt: the answering ones feed their next token and the readers
  share a prefill budget (`prefill_tokens` per step, oldest first), all packed into one eager forward, so a long
  newcomer is read in chunks while the others keep streaming, and the expert engine sees every token of the step
  in one pass (under `auto` one stream of the experts serves every newcomer's prompt and the running answers).

Each sequence keeps its own sampling settings, seed, stop strings and budget; a cancelled one leaves at the step
boundary. A sequence in a slot that a step does not name (another caller's, stepping separately) sits that step out.
"""
from __future__ import annotations

import logging
from collections import Counter

from kllama.infer.graphs import IDLE, GraphedDecoder
from kllama.infer.kv_cache import cache_argument, transformers_model  # noqa: F401 - re-exported for benchmarks
from kllama.infer.sampling import NonFiniteLogitsError, sample_rows
from kllama.infer.sequence import Sequence

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 2048


class SlotBatch:
    """Steps any set of sequences forward through one `GraphedDecoder`, a slot each (see the module docstring)."""

    def __init__(self, decoder: GraphedDecoder, stats: Counter[str] | None = None) -> None:
        self.decoder = decoder
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.slots: list[Sequence] = []  # slot i holds slots[i]
        self.lengths: list[int] = []  # positions cached in slot i
        self._slot_of: dict[int, int] = {}  # seq_id -> slot

    @property
    def sequences(self) -> int:
        """Sequences holding a slot."""
        return len(self.slots)

    def release(self, seq: Sequence) -> None:
        """Give up the slot of `seq` (ended or abandoned); the last slot's sequence moves into it."""
        slot = self._slot_of.pop(seq.seq_id, None)
        if slot is None:
            return
        last = len(self.slots) - 1
        if slot != last:
            self.decoder.move(last, slot, self.lengths[last])
            self.slots[slot], self.lengths[slot] = self.slots[last], self.lengths[last]
            self._slot_of[self.slots[slot].seq_id] = slot
        self.slots.pop()
        self.lengths.pop()

    def step(self, seqs: list[Sequence], prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> list[Sequence]:
        """Advance `seqs` (in arrival order) by one forward; returns the sequences that ended (finished, cancelled
        or failed), whose slots are freed. Sequences beyond the free slots wait. An error of the forward fails the
        step's sequences, not the caller."""
        ended = [seq for seq in seqs if seq.done]
        live = []
        for seq in seqs:
            if seq.done:
                continue
            if seq.cancel.is_set():
                seq.cancelled()
                self.stats["cancelled"] += 1
                ended.append(seq)
            else:
                live.append(seq)
        for seq in ended:
            self.release(seq)
        for seq in live:
            if seq.seq_id not in self._slot_of and len(self.slots) < self.decoder.max_batch:
                self._slot_of[seq.seq_id] = len(self.slots)
                self.slots.append(seq)
                self.lengths.append(0)
        running = [seq for seq in live if seq.seq_id in self._slot_of]
        if running:
            reading = any(seq.prefilling for seq in running)
            done = self._packed_step(running, prefill_tokens) if reading else self._decode_step(running)
            for seq in done:
                self.release(seq)
            ended.extend(done)
        return ended

    def _decode_step(self, running: list[Sequence]) -> list[Sequence]:
        stepping = {seq.seq_id for seq in running}
        ids = [seq.pending[0] if seq.seq_id in stepping else 0 for seq in self.slots]
        positions = [length if seq.seq_id in stepping else IDLE for seq, length in zip(self.slots, self.lengths)]
        rows = [slot for slot, seq in enumerate(self.slots) if seq.seq_id in stepping]
        fed = [self.slots[slot] for slot in rows]
        for seq in fed:
            seq.take(1)
        try:
            logits = self.decoder.step(ids, positions)  # [slots, V]
            if len(rows) < len(self.slots):
                logits = logits[rows]
            tokens, finite = sample_rows(logits, [seq.sampler for seq in fed])
        except Exception as exc:  # noqa: BLE001 - the step's requests get the error; the server keeps serving
            return self._failed(fed, exc)
        for slot in rows:
            self.lengths[slot] += 1
        self.stats["decode_steps"] += 1
        count_step(self.stats, len(fed), len(fed))
        return accept_tokens(fed, tokens, finite, self.stats)

    def _packed_step(self, running: list[Sequence], prefill_tokens: int) -> list[Sequence]:
        fed, segments = [], []
        budget = prefill_tokens
        for seq in sorted(running, key=lambda s: s.prefilling):  # answering first; the sort keeps arrival order
            reading = seq.prefilling
            if reading and budget <= 0:
                continue
            taken = seq.take(budget if reading else 1)
            budget -= len(taken) if reading else 0
            slot = self._slot_of[seq.seq_id]
            fed.append(seq)
            segments.append((slot, self.lengths[slot], taken))
        choosing = [i for i, seq in enumerate(fed) if not seq.pending]  # fully fed: their next token is due
        try:
            logits = self.decoder.packed(segments, choosing)  # [len(choosing), V]
            tokens, finite = sample_rows(logits, [fed[i].sampler for i in choosing])
        except Exception as exc:  # noqa: BLE001 - the step's requests get the error; the server keeps serving
            return self._failed(fed, exc)
        for slot, _, taken in segments:
            self.lengths[slot] += len(taken)
        self.stats["packed_steps"] += 1
        count_step(self.stats, len(fed), sum(len(taken) for _, _, taken in segments))
        return accept_tokens([fed[i] for i in choosing], tokens, finite, self.stats)

    def _failed(self, fed: list[Sequence], exc: Exception) -> list[Sequence]:
        logger.exception("decoding step failed (%d sequences)", len(fed), exc_info=exc)
        for seq in fed:
            seq.fail(exc)
        return fed


def count_step(stats: Counter[str], sequences: int, tokens: int) -> None:
    """Record one forward of `sequences` sequences and `tokens` tokens in the engine's counters."""
    stats["steps"] += 1
    stats["max_batch"] = max(stats["max_batch"], sequences)
    stats["max_step_tokens"] = max(stats["max_step_tokens"], tokens)


def accept_tokens(seqs: list[Sequence], tokens: list[int], finite: list[bool], stats: Counter[str]) -> list[Sequence]:
    """Hand each sequence the token chosen for it (`finite` False: its logits were not, so it fails instead);
    returns the sequences that ended. A sequence failing on its token (e.g. a tokenizer error) ends alone."""
    ended = []
    for seq, token, ok in zip(seqs, tokens, finite):
        before = seq.produced
        try:
            if ok:
                seq.accept(token)
            else:
                seq.fail(NonFiniteLogitsError(
                    f"the model produced NaN or infinite logits at answer token {seq.produced + 1}, so no token can "
                    "be chosen; its weights or adapter are broken (check adapter_name_or_path, or serve with "
                    "infer_dtype: float32)"))
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer failing to decode: only this sequence ends
            logger.exception("sequence %d failed after its token", seq.seq_id)
            seq.fail(exc)
        stats["generated_tokens"] += seq.produced - before
        if seq.done:
            ended.append(seq)
    return ended
