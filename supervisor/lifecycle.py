"""The daemon's state machine: one worker, its sleeps and wakes, the requests that use it, its restarts. The
workers themselves (spawn, watch, restart) are in workers.py, admission and the idle clock in admission.py, memory
samples in sampling.py.

Invariants:
- Transitions (sleep, wake, start, restart) run one at a time, under `_lock`.
- A request streams only while the state is AWAKE; a request that finds the model asleep (or its worker dead)
  waits for the one wake (or restart) in progress, starting it if there is none: never a second wake.
- A sleep closes the admission gate, lets the streaming requests finish for at most --drain-timeout (or cancels
  them: SLEEP_MODE_ABORT), then sleeps; requests that arrive meanwhile wait and wake the model again afterwards.
- The worker is believed: a request it refuses as asleep makes the daemon follow it (`reconcile`).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from ksleep.v1 import common_pb2, ksleep_pb2, worker_pb2
from ksleep.worker.errors import KsleepError, StateError, ValidationError
from ksleep.worker.poolfiles import remove_pool_files

from .admission import Admission, Gate, Ticket
from .config import DaemonConfig, runtime_dir
from .launcher import Forkserver, WorkerHandle
from .metrics import Metrics
from . import snapshot
from .monitor import MemoryHistory
from .snapshot import Snapshot
from .standby import Standby
from .sampling import Sampling
from .updates import Updates
from .workers import STATUS_DEADLINE, WAKE_DEADLINE, Workers

log = logging.getLogger("ksleep.lifecycle")
# seconds a worker's Sleep may take: it first lets cancelled streams leave (up to 30 s). (A worker that stops
# answering meanwhile is caught by the watchdog within --worker-timeout.)
SLEEP_DEADLINE = 90.0
S = common_pb2  # state names: S.STATE_AWAKE ...


class SleepAbortedError(KsleepError):
    status = "ABORTED"


class WorkerGoneError(KsleepError):
    status = "UNAVAILABLE"


class WorkerAsleepError(KsleepError):
    """The worker answered that it is asleep while this daemon thought it awake (it fell asleep by itself)."""

    status = "UNAVAILABLE"


class Lifecycle(Workers, Admission, Sampling, Updates):
    def __init__(self, config: DaemonConfig, metrics: Metrics | None = None, tag: int = 0):
        self.config = config
        self.tag = tag  # this worker's number in the daemon (its workers' socket names)
        self.replica = 0  # its number among the replicas of its model (set by the registry)
        self.switch = None  # set by the registry: wakes this model once the device has room for it
        self.metrics = metrics or Metrics()
        self.metrics.watch(self)
        self.forkserver = Forkserver(config.log_level)
        self.worker: WorkerHandle | None = None
        self.worker_info: worker_pb2.WorkerStatusResponse | None = None
        self._state = S.STATE_LOADING
        self._on_state: list = []  # called with each new state (the gRPC health service)
        self.sleep_level = 0
        self.restarts = self.sleeps_total = self.wakes_total = 0
        self.last_sleep: common_pb2.Transition | None = None
        self.last_wake: common_pb2.Transition | None = None
        self.last_ttft: float | None = None
        self.last_restart: common_pb2.Transition | None = None
        self.history = MemoryHistory(config.history)
        self.batch: common_pb2.BatchStats | None = None  # the worker's batch and KV cache, as last sampled
        self.weights = common_pb2.WeightsVersion(number=0, source=config.model)  # what every new worker loads
        self.memory_backend = None
        self.started_unix = time.time()
        self._lock = asyncio.Lock()
        self._bring_up: asyncio.Task | None = None
        self._gate = Gate()
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

    @property
    def state(self) -> int:
        return self._state

    @state.setter
    def state(self, value: int) -> None:
        changed, self._state = value != self._state, value
        for callback in self._on_state if changed else ():
            callback(value)

    def on_state(self, callback) -> None:
        self._on_state.append(callback)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def snapshot(self, history: bool = False) -> Snapshot:
        """What Status, the metrics, the HTTP face and the health check report, read at one moment."""
        return snapshot.take(self, history)

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
            if remove_pool_files(self.config.shm_dir, self.worker_info.pool_name):  # unless another daemon uses it
                log.info("removed the weight pool %s", self.worker_info.pool_name)

    # -- requests -------------------------------------------------------------------------------------------
    async def reconcile(self, worker: WorkerHandle, wakes_before: int | None = None) -> bool:
        """Read the worker's own state back after it refused a request as asleep: a worker can fall asleep by
        itself (a rebuild that failed behind a first forward leaves it at level 2). True when the request may be
        retried: ours followed (its admission then wakes the model, once), or another request refused the same
        way already did and the model was woken since `wakes_before` (the wake count when it was admitted)."""
        async with self._lock:
            if self.worker is not worker or (wakes_before is not None and self.wakes_total > wakes_before):
                return True  # replaced, or woken, meanwhile: the retry goes to the worker as it is now
            info = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=STATUS_DEADLINE)
            if info.state != S.STATE_ASLEEP:
                return False
            if self.state != S.STATE_AWAKE:
                return True  # another refused request made ours follow already; the retry's admission wakes it
            log.warning("worker %d is asleep at level %d though ksleepd had it awake; following it", worker.pid,
                        info.sleep_level)
            self.state, self.sleep_level = S.STATE_ASLEEP, max(1, info.sleep_level)
        self._record()
        return True

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
                wake = self._wake(overlap) if self.switch is None else self.switch(self, overlap)
                self._bring_up = asyncio.create_task(wake)
            task = self._bring_up
            try:
                await asyncio.shield(task)  # one waiter giving up does not cancel the wake for the others
            except Exception:
                if self._bring_up is not task and not self._stopping:
                    continue  # the worker died during the wake: wait for the restart now under way
                raise
        return waited

    async def wake(self) -> common_pb2.Transition:
        """WakeUp: wake now; an awake model returns an empty transition (once its worker confirms it is awake)."""
        if self.state == S.STATE_AWAKE and (self.worker is None or not await self.reconcile(self.worker)):
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
                        wake = (await worker.stub.Wake(request, timeout=WAKE_DEADLINE)).wake
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
            raise ValidationError(f"sleep level must be 1, 2 or 3, got {level}")
        with self._gate.closed():
            try:
                aborted = await self._drain_or_abort(mode)
                async with self._lock:
                    return await self._sleep_locked(level), aborted
            finally:
                self._touch()

    async def _drain_or_abort(self, mode: int) -> int:
        """With admission closed: let the running requests finish for at most --drain-timeout (WAIT), then cancel
        what is left (all of them for SLEEP_MODE_ABORT); returns how many were cancelled."""
        if mode != ksleep_pb2.SLEEP_MODE_ABORT:  # WAIT: the running requests may finish, for a bounded time
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), self.config.drain_timeout)
            if self._tickets:
                log.warning("%d request(s) still running after the %.0f s drain; aborting them",
                            len(self._tickets), self.config.drain_timeout)
        aborted = 0
        for ticket in list(self._tickets):
            ticket.abort()
            aborted += 1
        await self._drain()  # a cancelled call ends at once (its worker stream is closed)
        return aborted

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
                sleep = (await self.worker.stub.Sleep(worker_pb2.WorkerSleepRequest(level=level),
                                                      timeout=SLEEP_DEADLINE)).sleep
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
