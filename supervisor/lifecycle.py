"""The daemon's state machine: one worker, its sleeps and wakes, the requests that use it, its restarts.

Invariants:
- Transitions (sleep, wake, start, restart) run one at a time, under `_lock`.
- A request streams only while the state is AWAKE; a request that finds the model asleep (or its worker dead)
  waits for the one wake (or restart) in progress, starting it if there is none: never a second wake.
- A sleep closes the admission gate, lets the streaming requests finish (or cancels them: SLEEP_MODE_ABORT),
  then sleeps; requests that arrive meanwhile wait and wake the model again afterwards.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import grpc

from ksleep.v1 import common_pb2, ksleep_pb2, worker_pb2
from ksleep.worker.errors import KsleepError, StateError
from ksleep.worker.poolfiles import data_path, remove_pool_files

from .config import DaemonConfig, runtime_dir
from .launcher import Forkserver, WorkerHandle, WorkerStartError
from .metrics import Metrics
from .monitor import DeviceMemory, MemoryHistory, select_backend
from .standby import Standby

log = logging.getLogger("ksleep.lifecycle")
STATUS_DEADLINE = 5.0  # seconds a worker's Status may take (it reads device memory)
S = common_pb2  # state names: S.STATE_AWAKE ...


class SleepAbortedError(KsleepError):
    status = "ABORTED"


class WorkerGoneError(KsleepError):
    status = "UNAVAILABLE"


@dataclass(slots=True, eq=False)
class Ticket:
    """An admitted request: the worker it runs on, whether it waited for a wake, and how to cancel it."""

    worker: WorkerHandle
    woke: bool
    arrived_unix: float
    call: object = None  # the worker Generate call, once started
    aborted: bool = False
    first_token_seconds: float | None = field(default=None)


class Lifecycle:
    def __init__(self, config: DaemonConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.watch(self)
        self.forkserver = Forkserver(config.log_level)
        self.worker: WorkerHandle | None = None
        self.worker_info: worker_pb2.WorkerStatusResponse | None = None
        self.state = S.STATE_LOADING
        self.sleep_level = 0
        self.restarts = self.sleeps_total = self.wakes_total = 0
        self.last_sleep: common_pb2.Transition | None = None
        self.last_wake: common_pb2.Transition | None = None
        self.last_ttft: float | None = None
        self.last_restart: common_pb2.Transition | None = None
        self.history = MemoryHistory(config.history)
        self.batch: common_pb2.BatchStats | None = None  # the worker's batch and KV cache, as last sampled
        self.memory_backend = None
        self.started_unix = time.time()
        self._lock = asyncio.Lock()
        self._bring_up: asyncio.Task | None = None
        self._gate = asyncio.Event()
        self._gate.set()
        self._waiting = 0
        self._tickets: set[Ticket] = set()
        self._drained = asyncio.Condition()
        self._activity = asyncio.Event()
        self._last_activity = time.monotonic()
        self._stopping = False
        self._crashes: list[float] = []
        self._background: list[asyncio.Task] = []
        sockets = runtime_dir()
        sockets.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sockets = sockets
        self._spawned = 0
        self.standby = Standby(self._launch_standby, self._standby_wanted)

    # -- start and stop -------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._spawn(start_asleep=False)  # starts the forkserver first
        self.state = S.STATE_AWAKE
        self._touch()  # the idle timer starts now, not when loading began
        self._fill_standby()
        self._background = [asyncio.create_task(self._idle_loop()), asyncio.create_task(self._sample_loop())]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._background + ([self._bring_up] if self._bring_up else []):
            task.cancel()
        async with self._lock:
            self.state = S.STATE_STOPPED
            await self.standby.stop(self.config.grace)
            if self.worker is not None:
                await self.worker.stop(self.config.grace)
                self.worker = None
        await self.forkserver.stop(self.config.grace)
        if self.worker_info is not None and not self.config.keep_pool:
            remove_pool_files(self.config.shm_dir, self.worker_info.pool_name)
            log.info("removed the weight pool %s", self.worker_info.pool_name)

    async def _spawn(self, start_asleep: bool) -> dict[str, float]:
        """Start a worker; returns where the time went (fork, the worker's own load phases, connect)."""
        if not self.forkserver.alive:
            if self.forkserver.process is not None:
                log.warning("the forkserver is gone; starting a new one")
                self.forkserver = Forkserver(self.config.log_level)
            await self.forkserver.start()
        settings = self.config.worker_settings(self._next_socket(), start_asleep)
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
        self.worker_info = await worker.stub.Status(worker_pb2.WorkerStatusRequest())
        if self.memory_backend is None:
            self.memory_backend = select_backend(self.worker_info.device, self.worker_info.device_uuid)

    def _next_socket(self):
        self._spawned += 1  # each worker its own socket: a spare starts while another worker serves
        return self._sockets / f"worker-{os.getpid()}-{self._spawned}.sock"

    async def _launch_standby(self) -> WorkerHandle:
        if not self.forkserver.alive:
            raise WorkerStartError("the forkserver is not running")
        return await WorkerHandle.launch(self.forkserver, self.config.worker_settings(self._next_socket(), False, standby=True))

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
                await spare.stub.Wake(worker_pb2.WorkerWakeRequest(overlap=True))
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
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < 60] + [now]
        delay = 0.0 if len(self._crashes) == 1 else min(30.0, 0.5 * 2 ** (len(self._crashes) - 2))
        log.error("worker %d died (exit code %s); restart %d in %.1f s", worker.pid, code, self.restarts, delay)
        self._bring_up = asyncio.create_task(self._restart(delay, asleep))
        self._bring_up.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors reach the waiters
        self._touch()

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
            except BaseException:
                self.state = S.STATE_STOPPED
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

    # -- requests -------------------------------------------------------------------------------------------
    async def worker_died(self, worker: WorkerHandle, within: float = 5.0) -> bool:
        """After a failed call: True once `worker` is known dead and its crash handled (restart scheduled)."""
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), within)
        except asyncio.TimeoutError:
            return False
        await asyncio.sleep(0)  # let _watch() mark the crash before anyone is admitted again
        return True

    @contextlib.asynccontextmanager
    async def admit(self, arrived: float | None = None):
        """Hold a place for one Generate: wait until the model is awake (waking it if needed)."""
        arrived = arrived or time.time()
        self._waiting += 1
        self._touch()
        woke = False
        try:
            while True:
                await self._gate.wait()
                woke = await self.ensure_awake(overlap=True) or woke
                if self._gate.is_set() and self.state == S.STATE_AWAKE:
                    break
        finally:
            self._waiting -= 1
        ticket = Ticket(self.worker, woke, arrived)
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

    async def ensure_awake(self, overlap: bool = False) -> bool:
        """Wake (or restart) the model unless it is awake; True when this call had to wait for that. With
        `overlap` (a request is waiting), a wake this call starts returns once the copy is queued, and the
        request's forward runs behind the copy."""
        waited = False
        while self.state != S.STATE_AWAKE:
            if self._stopping:
                raise WorkerGoneError("ksleepd is shutting down")
            waited = True
            if self._bring_up is None or self._bring_up.done():
                self._bring_up = asyncio.create_task(self._wake(overlap))
            task = self._bring_up
            try:
                await asyncio.shield(task)  # one waiter giving up does not cancel the wake for the others
            except Exception:
                if self._bring_up is not task and not self._stopping:
                    continue  # the worker died during the wake: wait for the restart now under way
                raise
        return waited

    async def wake(self) -> common_pb2.Transition:
        """WakeUp: wake now; an awake model returns an empty transition."""
        if self.state == S.STATE_AWAKE:
            return common_pb2.Transition()
        await self.ensure_awake()
        return self.last_wake

    async def _wake(self, overlap: bool = False) -> None:
        async with self._lock:
            if self.state == S.STATE_AWAKE:
                return
            before, level = self.state, self.sleep_level
            self.state = S.STATE_WAKING
            t0 = time.perf_counter()
            try:
                if self.worker is None:  # level 3, or a worker that died
                    phases = await self._spawn(start_asleep=False)
                    wake = common_pb2.Transition(seconds=time.perf_counter() - t0, bytes=self.worker_info.memory.resident_bytes,
                                                 level=level, at_unix=time.time(), source="spawn", phases=phases)
                else:
                    worker = self.worker
                    try:
                        # the requests waiting now are told to the worker, which holds its first step for them
                        request = worker_pb2.WorkerWakeRequest(overlap=overlap, waiting_requests=self._waiting)
                        wake = (await worker.stub.Wake(request)).wake
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.UNAVAILABLE and await self.worker_died(worker):
                            raise WorkerGoneError("the worker died while waking; it is being restarted") from exc
                        raise
            except BaseException:
                if self.state == S.STATE_WAKING:  # unless a crash handler already took over
                    self.state = before
                raise
            self.state, self.sleep_level = S.STATE_AWAKE, 0
            self.wakes_total += 1
            self.last_wake = wake
            self.metrics.wake_seconds.observe(wake.seconds)
            log.info("awake in %.3f s (%s)", wake.seconds, wake.source)
        self._fill_standby()  # after a level-2 or -3 sleep, which stopped it
        self._record()

    # -- sleeping -------------------------------------------------------------------------------------------
    async def sleep(self, level: int | None, mode: int) -> tuple[common_pb2.Transition, int]:
        level = self.config.sleep_level if not level else level
        if level not in (1, 2, 3):
            raise ValueError(f"sleep level must be 1, 2 or 3, got {level}")
        self._gate.clear()
        try:
            aborted = 0
            if mode == ksleep_pb2.SLEEP_MODE_ABORT:
                for ticket in list(self._tickets):
                    ticket.aborted = True
                    if ticket.call is not None:
                        ticket.call.cancel()
                    aborted += 1
            async with self._drained:
                await self._drained.wait_for(lambda: not self._tickets)
            async with self._lock:
                return await self._sleep_locked(level), aborted
        finally:
            self._gate.set()
            self._touch()

    async def _sleep_locked(self, level: int) -> common_pb2.Transition:
        if self.state == S.STATE_ASLEEP and self.sleep_level >= level:
            return common_pb2.Transition(level=self.sleep_level)  # already at least that deep
        t0 = time.perf_counter()
        if level >= 2:  # the spare would keep the dropped pool mapped, or a CUDA context on the device
            await self.standby.stop(self.config.grace)  # (first: the worker may die meanwhile)
        if self.worker is None:
            raise StateError("no worker is running (it is restarting); sleep again once it is up")
        before = self.state
        self.state = S.STATE_SLEEPING
        try:
            if level == 3:
                worker, self.worker = self.worker, None
                await worker.stop(self.config.grace)
                resident = self.worker_info.memory.arena_bytes if before == S.STATE_AWAKE else 0
                sleep = common_pb2.Transition(seconds=time.perf_counter() - t0, bytes=resident, level=3, at_unix=time.time())
            else:
                sleep = (await self.worker.stub.Sleep(worker_pb2.WorkerSleepRequest(level=level))).sleep
        except BaseException:
            if self.state == S.STATE_SLEEPING:
                self.state = before
            self._fill_standby()  # still awake: the spare stopped above comes back
            raise
        self.state, self.sleep_level = S.STATE_ASLEEP, max(level, self.sleep_level)
        self.sleeps_total += 1
        self.last_sleep = sleep
        self.metrics.sleep_seconds.observe(sleep.seconds)
        log.info("asleep at level %d in %.3f s %s", level, sleep.seconds,
                 " ".join(f"{name}={seconds * 1e3:.1f}ms" for name, seconds in sleep.phases.items()))
        self._record()
        return sleep

    # -- idle timer and memory samples ----------------------------------------------------------------------
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

    async def _sample_loop(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.config.sample_interval)  # a periodic sampler, not a wait for a condition

    def _record(self) -> None:
        """Sample memory right after a transition too (without holding up the caller)."""
        self._touch()
        asyncio.create_task(self.sample(self.state))

    async def sample(self, state: int | None = None):
        """One memory sample, attributed to `state` (the state now, unless a transition just ended); the worker's
        batch figures are read at the same time."""
        state = self.state if state is None else state
        memory = None
        info = await self._worker_status()
        if self.memory_backend is not None:
            memory = await asyncio.to_thread(self.memory_backend.read, self.worker.pid if self.worker else None)
        elif info is not None:
            memory = DeviceMemory(info.memory.device_used_bytes, info.memory.device_total_bytes,
                                  info.memory.process_device_bytes if info.memory.HasField("process_device_bytes") else None)
        return self.history.add(state, memory, self.pool_bytes())

    async def _worker_status(self) -> worker_pb2.WorkerStatusResponse | None:
        """The serving worker's own Status (None without a worker, or when it does not answer in time); keeps
        `batch`, its batch and KV cache figures, up to date."""
        worker = self.worker
        if worker is None:
            self.batch = None
            return None
        try:
            info = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=STATUS_DEADLINE)
        except grpc.aio.AioRpcError:
            self.batch = None  # unknown now: better absent than stale
            return None
        self.batch = info.batch if info.HasField("batch") else None
        return info

    def pool_bytes(self) -> int:
        if self.worker_info is None:
            return 0
        path = data_path(self.config.shm_dir, self.worker_info.pool_name)
        return path.stat().st_size if path.exists() else 0
