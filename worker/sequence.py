"""One request inside the engine (`Sequence`) and the channel its tokens leave by (`RequestStream`).

A sequence is created on the caller's thread (prompt checked, sampler built), then owned by the engine thread:
the scheduler gives it a cache extent, feeds its prompt in chunks and one token per decode step, and its writer
turns each sampled id into a TokenEvent for the stream. The stream is read either by blocking iteration (the
library) or with `async for` on an asyncio loop (the worker's gRPC service); closing it cancels the request at the
next step.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import ClosedError
from .generation import SamplingParams, TokenEvent, TokenWriter

FINISH_ABORT = "abort"  # cancelled: the stream was closed, or the engine ended it (never sent as a token)
FINISH_ERROR = "error"  # its sampling failed: the stream gets the exception (never sent as a token)
POLL_SECONDS = 1.0  # how often a waiting reader checks that the engine is still alive
_ids = itertools.count()
_CLOSED = object()  # put into a stream by close(): a reader waiting on it stops


class Sequence:
    __slots__ = ("id", "prompt", "params", "writer", "stream", "output", "cached", "extent", "finish",
                 "warpers", "generator")

    def __init__(self, prompt: list[int], params: SamplingParams, writer: TokenWriter, stream: RequestStream,
                 device: torch.device):
        self.id = next(_ids)
        self.prompt, self.params, self.writer, self.stream = prompt, params, writer, stream
        self.output: list[int] = []
        self.cached = 0  # tokens (prompt, then output) whose keys and values are in the cache
        self.extent: int | None = None  # start of its cache extent while it runs
        self.finish: str | None = None
        self.warpers, self.generator = None, None
        if not params.greedy:
            self.warpers = LogitsProcessorList([TemperatureLogitsWarper(float(params.temperature))])
            if params.top_k:
                self.warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(float(params.top_p)))
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    @property
    def reserve_tokens(self) -> int:
        """Cache positions it may ever use: the prompt, every new token, and one more (see kvcache.py)."""
        return len(self.prompt) + self.params.max_tokens + 1

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)

    def next_input(self, budget: int) -> list[int]:
        """The tokens its next forward feeds: up to `budget` prompt tokens, else its last sampled token."""
        if self.prefilling:
            return self.prompt[self.cached: self.cached + budget]
        return self.output[-1:]


class RequestStream:
    """The TokenEvents of one request, in order; ends after the event with a finish reason, or raises the error
    that ended the request. Created unbound; `Engine.generate` attaches it to its sequence."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop
        self.prompt_tokens = 0  # set once the prompt is tokenized
        self._queue: queue.SimpleQueue | None = None if loop else queue.SimpleQueue()
        self._aqueue: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._cancel: Callable[[], None] | None = None
        self._alive: Callable[[], bool] = lambda: True
        self._done = False
        self._lock = threading.Lock()

    def attach(self, cancel: Callable[[], None], alive: Callable[[], bool]) -> None:
        self._cancel, self._alive = cancel, alive

    # -- the engine thread's side -----------------------------------------------------------------------------
    def put(self, items: list) -> None:
        """Hand over TokenEvents and/or one final exception (called directly for blocking streams; for asyncio
        ones through the loop, see Outbox)."""
        if self._queue is not None:
            for item in items:
                self._queue.put(item)
        else:
            for item in items:
                self._aqueue.put_nowait(item)

    # -- the reader's side ------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:  # a bound on every wait: an engine that stopped cannot leave a reader hanging
                self._check_alive()
        if item is _CLOSED:
            raise StopIteration
        return self._take(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        while True:
            try:
                item = await asyncio.wait_for(self._aqueue.get(), POLL_SECONDS)
                break
            except asyncio.TimeoutError:
                self._check_alive()
        if item is _CLOSED:
            raise StopAsyncIteration
        return self._take(item)

    def _check_alive(self) -> None:
        if not self._alive():
            self._done = True
            raise ClosedError("the engine stopped before the request finished")

    def _take(self, item) -> TokenEvent:
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    @property
    def finished(self) -> bool:
        return self._done

    def close(self) -> None:
        """Cancel the request unless it already ended (idempotent, never blocks); a reader waiting on the stream
        in another thread or task stops."""
        with self._lock:
            cancel, self._cancel = self._cancel, None
            done, self._done = self._done, True
        if done:
            return
        if cancel is not None:
            cancel()
        try:
            self.put([_CLOSED]) if self.loop is None else self.loop.call_soon_threadsafe(self.put, [_CLOSED])
        except RuntimeError:  # its event loop is closed: nobody reads this stream any more
            pass

    def __del__(self) -> None:
        self.close()


class Outbox:
    """A step's deliveries, handed over once per step: blocking streams directly, asyncio streams with one
    call_soon_threadsafe per event loop (each wakes that loop's selector)."""

    def __init__(self):
        self._by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, list]]] = {}

    def add(self, stream: RequestStream, items: list) -> None:
        if stream.loop is None:
            stream.put(items)
        else:
            self._by_loop.setdefault(stream.loop, []).append((stream, items))

    def flush(self) -> None:
        by_loop, self._by_loop = self._by_loop, {}
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody reads those streams any more
                pass


def _deliver(batch: list[tuple[RequestStream, list]]) -> None:
    for stream, items in batch:
        stream.put(items)
