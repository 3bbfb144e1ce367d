"""The workers behind the daemon: spawning one through the forkserver, adopting it (a spare included), watching
it (its exit, and a watchdog for one that stops answering) and restarting it with one backoff.

A mixin of Lifecycle (lifecycle.py), which owns the state these methods read and set.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import grpc

from ksleep.v1 import common_pb2, worker_pb2

from .launcher import Forkserver, WorkerHandle, WorkerStartError
from .monitor import select_backend

log = logging.getLogger("ksleep.lifecycle")
S = common_pb2
STATUS_DEADLINE = 5.0  # seconds a worker's Status may take (it reads device memory)
CLOSE_DELAY = 1.0  # seconds after a worker's death before its channel is closed
WAKE_DEADLINE = 600.0  # seconds a worker's Wake may take (at level 2 it reloads the weights from the model's files)


class Workers:
    async def _spawn(self, start_asleep: bool) -> dict[str, float]:
        """Start a worker; returns where the time went (fork, the worker's own load phases, connect)."""
        if not self.forkserver.alive:
            if self.forkserver.process is not None:
                log.warning("the forkserver is gone; starting a new one")
                self.forkserver = Forkserver(self.config.log_level)
            await self.forkserver.start()
        settings = self.config.worker_settings(self._next_socket(), start_asleep, weights=self.weights)
        worker = await WorkerHandle.launch(self.forkserver, settings)
        await self._adopt(worker)
        log.info("worker %d up: %s (%s in %.2f s)", worker.pid, self.worker_info.model, self.worker_info.load_source,
                 self.worker_info.load_seconds)
        phases = {"fork": worker.startup["fork"]}
        phases.update({f"worker.{k}": v for k, v in self.worker_info.load_phases.items()})
        phases["connect"] = max(0.0, worker.startup["start"] - self.worker_info.load_seconds)  # imports, CUDA, socket
        return phases

    async def _adopt(self, worker: WorkerHandle) -> None:
        """Make `worker` the one that serves (watched from now on: a death during the call below is a crash)."""
        self.worker = worker
        asyncio.create_task(self._watch(worker))
        self.worker_info = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=STATUS_DEADLINE)
        asyncio.create_task(self._watchdog(worker))
        if self.memory_backend is None:
            self.memory_backend = select_backend(self.worker_info.device, self.worker_info.device_uuid)

    def _next_socket(self):
        self._spawned += 1  # each worker its own socket: a spare starts while another worker serves
        return self._sockets / f"worker-{os.getpid()}-{self.tag}-{self._spawned}.sock"

    async def _launch_standby(self) -> WorkerHandle:
        if not self.forkserver.alive:
            raise WorkerStartError("the forkserver is not running")
        return await WorkerHandle.launch(self.forkserver, self.config.worker_settings(self._next_socket(), False, standby=True, weights=self.weights))

    def _standby_wanted(self) -> bool:
        """A spare loads the weights awake before it sleeps: start one only while the model is awake."""
        return self.config.standby and not self._stopping and self.state == S.STATE_AWAKE

    def _fill_standby(self, delay: float = 0.0) -> None:
        if self._standby_wanted():
            self.standby.fill(delay)

    async def _promote(self, spare: WorkerHandle, wake: bool) -> dict[str, float] | None:
        """The spare replaces the dead worker; woken at once (its copy queued) when the daemon was awake. None
        when it could not take over (it died too, or its wake failed): the caller spawns a worker instead."""
        t0 = time.perf_counter()
        try:
            await self._adopt(spare)
            phases = {"promote": time.perf_counter() - t0}
            if wake:
                t1 = time.perf_counter()
                await spare.stub.Wake(worker_pb2.WorkerWakeRequest(overlap=True), timeout=WAKE_DEADLINE)
                phases["wake"] = time.perf_counter() - t1
        except grpc.aio.AioRpcError as exc:
            log.warning("standby worker %d could not take over (%s); spawning a worker", spare.pid, exc.details())
            self.worker = None
            await spare.stop(self.config.grace)  # marks it stopping: its watcher does not count a crash
            return None
        log.info("standby worker %d took over", spare.pid)
        return phases

    async def _watch(self, worker: WorkerHandle) -> None:
        code = await worker.exited
        if worker.stopping or self._stopping or self.worker is not worker:
            return
        self.worker = None
        asleep = self.state == S.STATE_ASLEEP
        self.state = S.STATE_STOPPED
        self.restarts += 1
        delay = self._backoff()
        log.error("worker %d died (exit code %s); restart %d in %.1f s", worker.pid, code, self.restarts, delay)
        self._schedule_restart(delay, asleep)
        self._touch()
        await asyncio.sleep(CLOSE_DELAY)  # the calls it failed are handled first (a close under them hung the loop)
        await worker.channel.close()

    def _backoff(self) -> float:
        """Seconds before the next restart: none after a first crash, then doubling for crashes within a minute."""
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 60] + [now]
        return 0.0 if len(self._crashes) == 1 else min(self.config.restart_backoff, 0.5 * 2 ** (len(self._crashes) - 2))

    def _schedule_restart(self, delay: float, asleep: bool) -> None:
        self._bring_up = asyncio.create_task(self._restart(delay, asleep))
        self._bring_up.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors reach the waiters

    async def _watchdog(self, worker: WorkerHandle) -> None:
        """Ping the serving worker (its Status, which reads device memory off its event loop) whenever the
        memory sampler did not hear from it within the ping interval; one that leaves a ping unanswered for
        --worker-timeout (stopped, or stuck in a driver call) is killed: `_watch` then restarts it from the pool
        like any crash, and requests without a token yet are replayed."""
        timeout = self.config.worker_timeout
        interval = min(1.0, timeout / 4)
        while not worker.exited.done() and self.worker is worker and not self._stopping:
            try:
                if time.monotonic() - worker.answered > interval:
                    await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=timeout)
                    worker.answered = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                if worker.exited.done() or worker.stopping or self.worker is not worker:
                    return
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    log.error("worker %d left a health ping unanswered for %.1f s: killing it", worker.pid, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                    return
                log.warning("health ping of worker %d failed: %s", worker.pid, exc.code().name)
            await asyncio.sleep(interval)  # a periodic ping, not a wait for a condition

    async def _restart(self, delay: float, asleep: bool) -> None:
        t0 = time.perf_counter()
        if not self.standby.ready:
            await asyncio.sleep(delay)  # backoff timer (with a spare, it delays the next spare instead)
        async with self._lock:
            if self.worker is not None or self._stopping:
                return
            self.state = S.STATE_LOADING
            spare = self.standby.take()
            try:
                phases = await self._promote(spare, wake=not asleep) if spare is not None else None
                if phases is None:
                    spare = None
                    phases = {"backoff": delay, **await self._spawn(start_asleep=asleep)}
            except BaseException as exc:
                self.state = S.STATE_STOPPED
                if isinstance(exc, Exception) and not self._stopping:  # tried again later, not only on a request
                    delay = self._backoff()
                    log.error("restarting the worker failed (%s); next attempt in %.1f s", exc, delay)
                    self._schedule_restart(delay, asleep)
                raise
            if asleep:
                self.state, self.sleep_level = S.STATE_ASLEEP, max(1, self.sleep_level)
            else:
                self.state, self.sleep_level = S.STATE_AWAKE, 0
            memory = self.worker_info.memory  # as the new worker reported it before a promoting wake
            restored = memory.weight_bytes if spare is not None and not asleep else memory.resident_bytes
            self.last_restart = common_pb2.Transition(seconds=time.perf_counter() - t0, bytes=restored, at_unix=time.time(),
                                                      source="standby" if spare else "spawn", phases=phases)
        self._fill_standby(delay)
        self._record()

    async def worker_died(self, worker: WorkerHandle, within: float = 5.0) -> bool:
        """After a failed call: True once `worker` is known dead and its crash handled (restart scheduled)."""
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), within)
        except asyncio.TimeoutError:
            return False
        await asyncio.sleep(0)  # let _watch() mark the crash before anyone is admitted again
        return True

