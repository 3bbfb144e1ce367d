"""Admission: the gate requests pass to reach the worker, the ticket each admitted request holds, the drain a
sleep waits on, and the idle clock.

The gate is counted: every sleep in progress holds it closed, and it opens only when the last of them is done
(two overlapping sleeps each hold it; the first to finish does not reopen admission under the second).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from ksleep.v1 import common_pb2, ksleep_pb2
from ksleep.worker.errors import KsleepError

from .launcher import WorkerHandle

log = logging.getLogger("ksleep.lifecycle")
S = common_pb2


class Gate:
    def __init__(self):
        self._holders = 0
        self._open = asyncio.Event()
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._holders == 0

    async def wait_open(self) -> None:
        await self._open.wait()

    @contextlib.contextmanager
    def closed(self):
        """Hold admission closed for the duration of the block."""
        self._holders += 1
        self._open.clear()
        try:
            yield
        finally:
            self._holders -= 1
            if self._holders == 0:
                self._open.set()


@dataclass(slots=True, eq=False)
class Ticket:
    """An admitted request: the worker it runs on, whether it waited for a wake, and how to cancel it."""

    worker: WorkerHandle
    woke: bool
    arrived_unix: float
    wakes: int  # the daemon's wake count when it was admitted (has the model been woken since?)
    call: object = None  # the worker Generate call, once started
    aborted: bool = False
    first_token_seconds: float | None = field(default=None)

    def abort(self) -> None:
        """Cancel the request (its stream ends with ABORTED): a sleep that does not wait for it."""
        self.aborted = True
        if self.call is not None:
            self.call.cancel()


class Admission:
    """A mixin of Lifecycle (lifecycle.py), which owns the state these methods read and set."""

    @contextlib.asynccontextmanager
    async def admit(self, arrived: float | None = None):
        """Hold a place for one Generate: wait until the model is awake (waking it if needed)."""
        arrived = arrived or time.time()
        self._waiting += 1
        self._touch()
        woke = False
        try:
            while True:
                await self._gate.wait_open()
                woke = await self.ensure_awake(overlap=True) or woke
                if self._gate.is_open and self.state == S.STATE_AWAKE:
                    break
        finally:
            self._waiting -= 1
        ticket = Ticket(self.worker, woke, arrived, self.wakes_total)
        self._tickets.add(ticket)
        try:
            yield ticket
        finally:
            self._tickets.discard(ticket)
            if ticket.first_token_seconds is not None:
                self.last_ttft = ticket.first_token_seconds
            self._touch()
            async with self._drained:
                self._drained.notify_all()

    @property
    def in_flight(self) -> int:
        return self._waiting + len(self._tickets)

    def idle_seconds(self) -> float:
        return 0.0 if self.in_flight else time.monotonic() - self._last_activity

    async def _drain(self) -> None:
        async with self._drained:
            await self._drained.wait_for(lambda: not self._tickets)

    def _touch(self) -> None:
        self._last_activity = time.monotonic()
        self._activity.set()

    async def _idle_loop(self) -> None:
        timeout = self.config.idle_timeout
        if timeout <= 0:
            return
        while True:
            self._activity.clear()
            if self.state == S.STATE_AWAKE and not self.in_flight:
                remaining = self._last_activity + timeout - time.monotonic()
                if remaining <= 0:
                    try:
                        await self.sleep(None, ksleep_pb2.SLEEP_MODE_WAIT)
                    except (KsleepError, grpc.aio.AioRpcError) as exc:  # e.g. the worker died meanwhile: try later
                        log.warning("idle sleep failed: %s", exc)
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._activity.wait(), remaining)
            else:
                await self._activity.wait()

