"""Starting and stopping workers: the forkserver process, and a handle per worker.

TGI's launcher, adapted: stale sockets are removed before a spawn, the environment is explicit, readiness is
the worker's socket accepting a connection (it binds only once the model is loaded), exits are reported by the
forkserver (which reaps its children), and stop is SIGTERM, then SIGKILL after a grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import psutil

from ksleep.v1 import forkserver_pb2, worker_pb2_grpc
from ksleep.worker import framing
from ksleep.worker.errors import KsleepError

log = logging.getLogger("ksleep.launcher")
EARLY_EXIT_SECONDS = 60.0  # how long the exit of a worker whose handle is not made yet is remembered
CHANNEL_OPTIONS = [
    # The socket appears when the model is ready: look for it often, so a restart is not held up by backoff.
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 25),  # a refused unix-socket connect costs microseconds
    ("grpc.max_receive_message_length", 64 << 20),
]


class WorkerStartError(KsleepError):
    """The worker could not start (its model was refused, or it died while loading)."""

    status = "UNAVAILABLE"

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        if status:
            self.status = status


def worker_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a worker inherits: ours minus nothing surprising, plus what the forkserver must know."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


class Forkserver:
    """The forkserver child process and its event stream."""

    def __init__(self, log_level: str = "info"):
        self.log_level = log_level
        self.process: asyncio.subprocess.Process | None = None
        self._events: asyncio.Queue = asyncio.Queue()  # started / rejected, in request order
        self._exits: dict[int, asyncio.Future] = {}
        self._early_exits: dict[int, tuple[float, int]] = {}  # pid -> (when, exit code) reported before its handle
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self.preload_seconds = 0.0

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ksleep.worker.forkserver",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=worker_environment({"KSLEEP_LOG_LEVEL": self.log_level}),
        )
        ready = await framing.read_async(self.process.stdout, forkserver_pb2.ForkserverEvent)
        if ready is None or ready.WhichOneof("event") != "ready":
            code = await self.process.wait()
            raise WorkerStartError(f"the forkserver exited with code {code} before it was ready")
        self.preload_seconds = ready.ready.preload_seconds
        self._reader = asyncio.create_task(self._read_events())
        log.info("forkserver %d ready (preloaded in %.1f s)", self.process.pid, self.preload_seconds)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def _read_events(self) -> None:
        while (event := await framing.read_async(self.process.stdout, forkserver_pb2.ForkserverEvent)) is not None:
            kind = event.WhichOneof("event")
            if kind == "exited":
                future = self._exits.pop(event.exited.pid, None)
                if future is None:  # its handle does not exist yet (it died at once): kept for it, briefly
                    self._early_exits[event.exited.pid] = (time.monotonic(), event.exited.returncode)
                elif not future.done():
                    future.set_result(event.exited.returncode)
            else:
                self._events.put_nowait(event)
        # The forkserver is gone. Its workers may live on; their handles watch them through pidfds.
        self._events.put_nowait(None)

    def exit_future(self, pid: int) -> asyncio.Future:
        """A future for the exit code of worker `pid`, taken once by its handle right after the fork. Resolved
        futures leave the table, so that a recycled pid never looks already dead."""
        future = self._exits.get(pid) or asyncio.get_running_loop().create_future()
        now = time.monotonic()
        self._early_exits = {p: e for p, e in self._early_exits.items() if now - e[0] < EARLY_EXIT_SECONDS}
        early = self._early_exits.pop(pid, None)
        if early is not None:
            future.set_result(early[1])
        else:
            self._exits[pid] = future  # (resolved by the forkserver's report, or by the handle's pidfd)
            future.add_done_callback(lambda f: self._exits.get(pid) is f and self._exits.pop(pid))
        return future

    async def fork(self, settings: forkserver_pb2.WorkerSettings) -> int:
        """Fork a worker; returns its pid. Cancelling the caller does not cancel the exchange: its answer is still
        read (else the next fork would get it) and a worker it started is killed."""
        exchange = asyncio.ensure_future(self._fork(settings))
        try:
            return await asyncio.shield(exchange)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                pid = await exchange
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise

    async def _fork(self, settings: forkserver_pb2.WorkerSettings) -> int:
        async with self._lock:
            if not self.alive:
                raise WorkerStartError("the forkserver is not running")
            self.process.stdin.write(framing.encode(forkserver_pb2.ForkRequest(settings=settings)))
            await self.process.stdin.drain()
            event = await self._events.get()
        if event is None:
            raise WorkerStartError("the forkserver died while starting a worker")
        if event.WhichOneof("event") == "rejected":
            raise WorkerStartError(event.rejected.error, event.rejected.status or "INVALID_ARGUMENT")
        return event.started.pid

    async def stop(self, grace: float) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.stdin.close()  # end of input: the forkserver terminates its workers and exits
        try:
            await asyncio.wait_for(self.process.wait(), grace)
        except asyncio.TimeoutError:
            self.process.kill()
            await self.process.wait()
        if self._reader:
            await self._reader


class WorkerHandle:
    """One running worker: its pid, its channel, and a future that resolves with its exit code."""

    def __init__(self, pid: int, socket_path: Path, exited: asyncio.Future):
        self.pid = pid
        self.socket_path = socket_path
        self.exited = exited
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.stopping = False
        self.answered = 0.0  # monotonic time of its last Status answer (the watchdog's and the sampler's)
        self.startup: dict[str, float] = {}  # seconds: fork (forkserver), start (fork to socket accepting)
        self._watch_pidfd()
        exited.add_done_callback(self._gone)

    def _gone(self, _) -> None:
        """A worker that exited leaves its socket behind (each worker has its own path). (Its channel is not closed
        here: closing a grpc.aio channel from this callback while a call on it was failing hung the loop, seen in
        tests; it stays open, as it did before each worker had its own socket.)"""
        self.socket_path.unlink(missing_ok=True)

    def _watch_pidfd(self) -> None:
        """Also learn of the exit from the kernel, in case the forkserver that would report it is gone."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return  # already gone: the forkserver reports it
        loop = asyncio.get_running_loop()

        def gone() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            # Give the forkserver's report (which carries the exit code) a moment to arrive first.
            loop.call_later(0.5, lambda: self.exited.done() or self.exited.set_result(None))

        loop.add_reader(fd, gone)

    @classmethod
    async def launch(cls, forkserver: Forkserver, settings: forkserver_pb2.WorkerSettings) -> WorkerHandle:
        socket_path = Path(settings.socket_path)
        socket_path.unlink(missing_ok=True)  # a stale socket would look like a ready worker
        error_file = Path(f"{socket_path}.error")  # where a worker that cannot load says why
        error_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        pid = await forkserver.fork(settings)
        handle = cls(pid, socket_path, forkserver.exit_future(pid))
        forked = time.perf_counter()
        ready = asyncio.ensure_future(handle.channel.channel_ready())
        try:
            await asyncio.wait([ready, handle.exited], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # nobody will use this worker: it must not live on, loading
            ready.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # it serves nothing yet; a pool it was building stays a .tmp that pool.py sweeps
            await handle.channel.close()  # its socket goes with its exit (_gone)
            raise
        handle.startup = {"fork": forked - t0, "start": time.perf_counter() - forked}
        if not ready.done():
            ready.cancel()
            await handle.channel.close()
            if error_file.exists():
                report = json.loads(error_file.read_text())
                error_file.unlink()
                raise WorkerStartError(f"loading {settings.model} failed: {report['message']}", report["status"])
            raise WorkerStartError(f"worker {pid} exited with code {handle.exited.result()} while loading "
                                   f"{settings.model} (see its log above)")
        return handle

    async def stop(self, grace: float) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code. Processes the worker started (a
        compiler's helpers, say) are ended with it: none of ours outlives the worker."""
        self.stopping = True
        children = []
        if not self.exited.done():
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(self.pid).children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
            except asyncio.TimeoutError:
                log.warning("worker %d ignored SIGTERM for %.0f s; killing it", self.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                await self.exited
        if children:
            await asyncio.to_thread(end_processes, children, grace)
        await self.channel.close()  # its socket went with its exit (_gone)
        return self.exited.result()


def end_processes(processes: list[psutil.Process], grace: float) -> None:
    """SIGTERM to those still alive, SIGKILL to those left after `grace` seconds (a bounded wait)."""
    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=grace)
