"""A worker process: load the model, then serve the Worker service on a unix socket until told to stop.

The socket is bound only once the model is ready, so a supervisor that can connect can generate. The worker
stops on SIGTERM (finishing in-flight calls within a grace period) and when its supervisor dies, so no
orphan ever holds GPU memory.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from ksleep.v1 import forkserver_pb2, worker_pb2_grpc

from .config import WorkerConfig
from .engine import Engine
from .interceptor import ErrorInterceptor, status_for
from .prepared import PreparedModel
from .service import WorkerService

log = logging.getLogger("ksleep.worker")
GRACE_SECONDS = 5.0
# The engine thread hands the GIL to the gRPC thread while the GPU runs a step and needs it back the moment the
# step ends; with Python's default 5 ms switch interval that handback could take most of a decode step.
SWITCH_INTERVAL = 0.0005


def run_worker(settings: forkserver_pb2.WorkerSettings, prepared: PreparedModel | None = None) -> int:
    sys.setswitchinterval(SWITCH_INTERVAL)
    logging.basicConfig(level=settings.log_level.upper() or "INFO", stream=sys.stderr, force=True,
                        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(settings, prepared))
    except KeyboardInterrupt:
        return 0


async def _serve(settings: forkserver_pb2.WorkerSettings, prepared: PreparedModel | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _watch_supervisor(settings.supervisor_pid, stop)
    config = WorkerConfig.from_pb(settings)
    try:  # all torch work runs on the engine's own thread; these calls wait for it
        engine = await asyncio.to_thread(Engine.load, config, prepared, not settings.start_asleep)
        if settings.standby:  # a spare: its kernels were loaded by the warm-up above; now give the device back,
            await asyncio.to_thread(engine.sleep, 1)  # and be ready only once a promotion's
            await asyncio.to_thread(engine.wait_pinned)  # wake copies at full speed
    except Exception as exc:
        _report_load_error(settings.socket_path, exc)
        raise
    if stop.is_set():
        engine.close()
        return 0
    service = WorkerService(engine)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()],
                             options=[("grpc.max_receive_message_length", 64 << 20)])
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    socket = Path(settings.socket_path)
    socket.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket is created 0600: only our user may drive the GPU
    try:
        server.add_insecure_port(f"unix:{socket}")
    finally:
        os.umask(old_umask)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s (%s)", config.model, socket, engine.load_report)
    await stop.wait()
    log.info("stopping")
    await health.enter_graceful_shutdown()
    await server.stop(GRACE_SECONDS)
    await asyncio.to_thread(engine.close)  # the pool stays for the next worker
    socket.unlink(missing_ok=True)
    return 0


def _report_load_error(socket_path: str, exc: Exception) -> None:
    """Tell the supervisor why loading failed: it reads `<socket>.error` (launcher.py) when the worker exits
    before serving."""
    code, message = status_for(exc)
    path = Path(f"{socket_path}.error")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"status": code.name, "message": message}, f)


def _watch_supervisor(pid: int, stop: asyncio.Event) -> None:
    """Set `stop` when process `pid` exits (a pidfd becomes readable then: no polling)."""
    if not pid:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        stop.set()
        return
    loop = asyncio.get_running_loop()

    def gone() -> None:
        log.warning("supervisor %d is gone; exiting", pid)
        loop.remove_reader(fd)
        os.close(fd)
        stop.set()

    loop.add_reader(fd, gone)
