"""Continuous batching: one thread runs one decode batch that requests join and leave at token boundaries.

Requests wait in a bounded queue (`max_queue` sequences; a full queue refuses new ones at once, so the server can
answer 429 instead of piling up work); the running batch takes up to `max_batch` sequences, oldest first, and every
step feeds all of them through one forward (`GenerationEngine.step`). A sequence whose client went away is dropped at
the next step, whether it is running or still waiting.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

from kllama.infer.engine import GenerationEngine
from kllama.infer.sequence import Sequence

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The waiting queue has no room for a request's sequences."""


class Scheduler:
    """A daemon thread stepping the running batch of `engine`; `submit` queues sequences for it."""

    def __init__(self, engine: GenerationEngine, *, max_batch: int = 32, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kllama-scheduler", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Sequences queued behind the running batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences in the running batch."""
        return len(self._running)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue `seqs` together, or raise QueueFullError when the queue cannot take them all."""
        with self._wake:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) + len(seqs) > self.max_queue + max(0, self.max_batch - len(self._running)):
                raise QueueFullError(f"{len(self._waiting)} sequences are waiting (limit {self.max_queue})")
            self._waiting.extend(seqs)
            self.engine.stats["requests"] += len(seqs)
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after the current step; sequences still queued or running are cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    def _admit(self) -> list[Sequence]:
        # Under the lock: drop waiting sequences whose client left, fill free batch places in arrival order.
        for seq in [s for s in self._waiting if s.cancel.is_set()]:
            self._waiting.remove(seq)
            seq.cancelled()
            self.engine.stats["cancelled"] += 1
        while self._waiting and len(self._running) < self.max_batch:
            self._running.append(self._waiting.popleft())
        return list(self._running)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    break
                batch = self._admit()
            if not batch:
                continue
            try:
                ended = self.engine.step(batch)
            except Exception as exc:  # noqa: BLE001 - a bug outside the forward: fail the batch, keep serving
                logger.exception("scheduler step failed")
                for seq in batch:
                    seq.fail(exc)
                    self.engine.release(seq)
                ended = batch
            gone = {id(seq) for seq in ended}
            self._running = [seq for seq in self._running if id(seq) not in gone]
        for seq in [*self._running, *self._waiting]:
            seq.cancelled()
