"""The bridge between async request handlers and the scheduler thread.

A request's `n` choices become `n` sequences submitted together; their chunks come back through one asyncio queue
as `(choice index, chunk)`. Leaving early — the client disconnected, the handler was cancelled, the stream closed —
sets the request's cancel event, which drops its sequences at the next token boundary (or from the queue).
"""
from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from starlette.requests import Request

from kllama.infer.engine import GenerationEngine, StreamChunk
from kllama.infer.sampling import SamplingParams
from kllama.infer.scheduler import Scheduler

DISCONNECT_POLL_S = 0.1  # how often a non-streaming request checks whether its client is still there


class Submission:
    """The sequences of one request, queued on the scheduler (raises QueueFullError when the queue is full)."""

    def __init__(self, scheduler: Scheduler, engine: GenerationEngine, prompt_ids: list[int],
                 choices: list[SamplingParams]) -> None:
        loop = asyncio.get_running_loop()
        self.cancel = threading.Event()
        self._items: asyncio.Queue[tuple[int, StreamChunk | BaseException]] = asyncio.Queue()

        def emitter(index: int):  # noqa: ANN202 - the emit callback of choice `index`
            def emit(item: StreamChunk | BaseException) -> None:
                try:
                    loop.call_soon_threadsafe(self._items.put_nowait, (index, item))
                except RuntimeError:  # the event loop is gone (server shutting down): nowhere to deliver
                    self.cancel.set()
            return emit

        self.sequences = [engine.new_sequence(prompt_ids, params, emitter(i), self.cancel)
                          for i, params in enumerate(choices)]
        scheduler.submit(self.sequences)

    async def items(self) -> AsyncIterator[tuple[int, StreamChunk]]:
        """Every choice's chunks as they come, until each choice has its finish_reason; an error of any choice is
        raised. Leaving the iteration early cancels the request."""
        open_choices = len(self.sequences)
        try:
            while open_choices:
                index, item = await self._items.get()
                if isinstance(item, BaseException):
                    raise item
                yield index, item
                if item.finish_reason is not None:
                    open_choices -= 1
        finally:
            self.cancel.set()

    async def cancel_on_disconnect(self, request: Request) -> None:
        """Until cancelled: set the cancel event as soon as the client of `request` is gone."""
        while not self.cancel.is_set():
            if await request.is_disconnected():
                self.cancel.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)
