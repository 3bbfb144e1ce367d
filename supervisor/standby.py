"""The standby: a spare worker, loaded, warmed up and asleep, that takes over when the worker dies (--standby).

A worker restarted from the forkserver pays for CUDA's initialisation, a first copy of the weights through a
staging ring (a new process has not pinned the pool yet) and its kernels' first load: about 2 s for a 7B on an
H200. The spare has all of that behind it, so replacing a dead worker with it costs one wake from the pinned pool
(about 0.3 s). The price is its CUDA context, ~0.5-1 GB of device memory, held asleep or awake, and, while it
starts, the weights' device memory a second time (it loads and warms up awake, then sleeps; so it is started only
while the model is awake). So it is opt-in, and stopped at sleep levels 2 (its mapping would keep the dropped pool
alive) and 3 (nothing of ours on the device).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from .launcher import WorkerHandle

log = logging.getLogger("ksleep.standby")
RETRIES = 3  # failed starts within RETRY_WINDOW before the spare is left out until the next fill()
RETRY_WINDOW = 300.0


class Standby:
    """At most one spare worker. `fill()` starts one in the background; `take()` hands a ready one over."""

    def __init__(self, launch: Callable[[], Awaitable[WorkerHandle]], wanted: Callable[[], bool]):
        self._launch = launch
        self._wanted = wanted  # checked again when a delayed start comes due
        self._handle: WorkerHandle | None = None
        self._task: asyncio.Task | None = None
        self._failures: list[float] = []

    @property
    def pid(self) -> int:
        """The ready spare's pid; 0 when there is none (yet)."""
        return self._handle.pid if self._handle is not None else 0

    @property
    def ready(self) -> bool:
        return self._handle is not None and not self._handle.exited.done()

    @property
    def starting(self) -> bool:
        return self._task is not None and not self._task.done()

    def fill(self, delay: float = 0.0) -> None:
        """Start a spare unless one is ready or on its way."""
        if self._handle is None and not self.starting:
            self._task = asyncio.create_task(self._start(delay))

    def take(self) -> WorkerHandle | None:
        """The ready spare, now the caller's to run and stop; None when there is none."""
        handle = self._handle if self.ready else None
        self._handle = None
        return handle

    async def stop(self, grace: float) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # a spare still loading is killed by WorkerHandle.launch
            with contextlib.suppress(asyncio.CancelledError):
                await task
        handle, self._handle = self._handle, None
        if handle is not None:
            await handle.stop(grace)
            log.info("standby worker %d stopped", handle.pid)

    async def _start(self, delay: float) -> None:
        await asyncio.sleep(delay)  # backoff timer
        if not self._wanted():
            return  # e.g. the model fell asleep meanwhile: the next wake fills again
        t0 = time.perf_counter()
        try:
            handle = await self._launch()
        except Exception as exc:  # noqa: BLE001 - a spare that cannot start must not take the daemon down
            log.warning("the standby worker did not start: %s", exc)
            self._retry()
            return
        self._handle = handle
        handle.exited.add_done_callback(lambda _: self._lost(handle))
        log.info("standby worker %d ready (asleep, warmed up) in %.2f s", handle.pid, time.perf_counter() - t0)

    def _lost(self, handle: WorkerHandle) -> None:
        if self._handle is handle:  # died while a spare (not taken over, not stopped)
            self._handle = None
            log.warning("standby worker %d died (exit code %s)", handle.pid, handle.exited.result())
            self._retry()

    def _retry(self) -> None:
        now = time.monotonic()
        self._failures = [t for t in self._failures if now - t < RETRY_WINDOW] + [now]
        if len(self._failures) > RETRIES:
            log.error("the standby worker failed %d times in %.0f s; running without one until the next wake",
                      len(self._failures), RETRY_WINDOW)
            return
        self._task = asyncio.create_task(self._start(2.0 ** len(self._failures)))
