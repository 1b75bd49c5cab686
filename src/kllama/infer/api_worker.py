"""One generation thread behind the async API: requests queue up in arrival order and run one at a time.

The model runs in a plain thread (a forward pass would block the event loop); each request gets its chunks back
through an asyncio queue, and a request whose client went away sets its cancel event, which stops its decoding
between two tokens (or skips it when it has not started).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from kllama.infer.engine import FINISH_CANCELLED, GenerationEngine, StreamChunk
from kllama.infer.sampling import SamplingParams

Emit = Callable[[StreamChunk | BaseException], None]


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    cancel: threading.Event
    emit: Emit


class GenerationWorker:
    """A daemon thread that runs queued generation jobs on the engine, first come first served."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kllama-generation", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Requests queued behind the one running."""
        return self._jobs.qsize()

    def submit(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event, emit: Emit) -> None:
        """Queue a job; `emit` receives its chunks (the last has a finish_reason) or the exception it raised."""
        self._jobs.put(_Job(prompt_ids, params, cancel, emit))

    def close(self) -> None:
        """Stop the thread after the jobs already queued."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                self.engine.stats["cancelled"] += 1
                job.emit(StreamChunk("", FINISH_CANCELLED))
                continue
            try:
                for chunk in self.engine.stream(job.prompt_ids, job.params, job.cancel):
                    job.emit(chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the request, which turns it into an error reply
                job.emit(exc)


async def generate_async(worker: GenerationWorker, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamChunk]:
    """Queue a generation and yield its chunks; leaving early (client gone, task cancelled) cancels the job."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[StreamChunk | BaseException] = asyncio.Queue()
    cancel = threading.Event()

    def emit(item: StreamChunk | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): the chunk has nowhere to go
            cancel.set()

    worker.submit(prompt_ids, params, cancel, emit)
    try:
        while True:
            item = await chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        cancel.set()
