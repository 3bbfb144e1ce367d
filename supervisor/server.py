"""The public gRPC face of ksleepd: the Ksleep service, grpc.health.v1 and server reflection."""
from __future__ import annotations

import logging
import os
import time
from importlib.metadata import PackageNotFoundError, version

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc, worker_pb2
from ksleep.worker.errors import ValidationError
from ksleep.worker.generation import SamplingParams, check_request, prompt_from_pb
from ksleep.worker.interceptor import ErrorInterceptor
from ksleep.worker.limits import PAD_TOKENS

from .auth import ControlTokenInterceptor
from .config import DaemonConfig
from .lifecycle import Lifecycle, SleepAbortedError, WorkerAsleepError, WorkerGoneError
from .metrics import Metrics

log = logging.getLogger("ksleep.server")
SERVICE = ksleep_pb2.DESCRIPTOR.services_by_name["Ksleep"].full_name
MAX_MESSAGE = 16 << 20  # bytes; a prompt beyond the context is refused by the worker anyway
RETRIES = 2  # times a request is replayed on a new worker when its worker died before its first token

try:
    VERSION = version("ksleep")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0+source"


class KsleepService(ksleep_pb2_grpc.KsleepServicer):
    """The public API; the HTTP face calls the same methods (with context=None)."""

    def __init__(self, lifecycle: Lifecycle, metrics: Metrics):
        self.lifecycle = lifecycle
        self.metrics = metrics

    async def Generate(self, request: ksleep_pb2.GenerateRequest, context):
        arrived = time.time()
        self.check(request)  # before admission: a request refused here never wakes, spawns or queues anything
        for attempt in range(RETRIES + 1):
            sent = 0
            async with self.lifecycle.admit(arrived) as ticket:
                try:
                    async for message in self._relay(request, ticket):
                        sent += 1
                        yield message
                    return
                except (WorkerGoneError, WorkerAsleepError) as exc:
                    # A worker that died (or fell asleep by itself) before this request's first token: the
                    # request is retried, unseen, on its successor (or after one wake). Once tokens have left, the
                    # client must see the error.
                    if sent or attempt == RETRIES:
                        raise
                    log.warning("%s before the first token; retrying the request", exc)

    def check(self, request: ksleep_pb2.GenerateRequest) -> None:
        """Everything that can be checked without the model (ValidationError): the parameters, the prompt's shape
        and size, and its length against the context and the KV cache the worker last reported."""
        prompt, params = prompt_from_pb(request.prompt), SamplingParams.from_pb(request.params)
        info = self.lifecycle.worker_info
        cache = info.batch.kv_cache_tokens - PAD_TOKENS if info is not None and info.HasField("batch") else None
        check_request(prompt, params, info.context_tokens if info is not None else None, cache)

    async def _relay(self, request: ksleep_pb2.GenerateRequest, ticket):
        call = ticket.worker.stub.Generate(worker_pb2.WorkerGenerateRequest(
            prompt=request.prompt, params=request.params, arrived_unix=ticket.arrived_unix))
        ticket.call = call
        prompt_tokens = completion = 0
        ttft = None
        try:
            async for response in call:
                token = response.token
                prompt_tokens = prompt_tokens or response.prompt_tokens
                completion += 1
                if ttft is None:
                    ttft = ticket.first_token_seconds = token.elapsed_seconds
                message = ksleep_pb2.GenerateResponse(token=token)
                if token.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    total = time.time() - ticket.arrived_unix
                    message.summary.CopyFrom(ksleep_pb2.GenerateSummary(
                        prompt_tokens=prompt_tokens, completion_tokens=completion, ttft_seconds=ttft,
                        total_seconds=total, woke=ticket.woke))
                    self.metrics.ttft_seconds.observe(ttft)
                    self.metrics.request_seconds.observe(total)
                    self.metrics.tokens.inc(completion)
                yield message
        except BaseException as exc:
            # A cancelled worker call raises CancelledError: ours when SLEEP_MODE_ABORT did it.
            if ticket.aborted and not isinstance(exc, GeneratorExit):
                raise SleepAbortedError("cancelled: the model was put to sleep with SLEEP_MODE_ABORT") from exc
            if (isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                    and await self.lifecycle.reconcile(ticket.worker)):
                raise WorkerAsleepError("the worker was asleep") from exc
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE or (
                    isinstance(exc, Exception) and ticket.worker.exited.done()):
                if await self.lifecycle.worker_died(ticket.worker):
                    raise WorkerGoneError("the worker died during this request; it is being restarted") from exc
            raise
        finally:
            call.cancel()  # the client went away: stop the worker's stream too

    async def Sleep(self, request: ksleep_pb2.SleepRequest, context) -> ksleep_pb2.SleepResponse:
        level = request.level if request.HasField("level") else None
        if level is not None and level not in (1, 2, 3):
            raise ValidationError(f"sleep level must be 1, 2 or 3, got {level}")
        transition, aborted = await self.lifecycle.sleep(level, request.mode)
        return ksleep_pb2.SleepResponse(sleep=transition, aborted_requests=aborted)

    async def WakeUp(self, request: ksleep_pb2.WakeUpRequest, context) -> ksleep_pb2.WakeUpResponse:
        return ksleep_pb2.WakeUpResponse(wake=await self.lifecycle.wake())

    async def Status(self, request: ksleep_pb2.StatusRequest, context) -> ksleep_pb2.StatusResponse:
        await self.lifecycle.sample()  # figures of now, not of the last periodic sample
        return status_message(self.lifecycle, request.include_history)


def status_message(lc: Lifecycle, include_history: bool = False) -> ksleep_pb2.StatusResponse:
    info = lc.worker_info
    latest = lc.history.samples[-1] if lc.history.samples else None
    out = ksleep_pb2.StatusResponse(
        state=lc.state, sleep_level=lc.sleep_level, model=lc.config.model,
        device=info.device if info else lc.config.device, weight_bytes=info.memory.weight_bytes if info else 0,
        device_used_bytes=(latest.device_used or 0) if latest else 0,  # 0 (unset): no reading
        device_total_bytes=info.memory.device_total_bytes if info else 0, pool_bytes=lc.pool_bytes(),
        worker_pid=lc.worker.pid if lc.worker else 0, restarts=lc.restarts, in_flight=lc.in_flight,
        idle_seconds=lc.idle_seconds(), idle_timeout_seconds=lc.config.idle_timeout,
        sleeps_total=lc.sleeps_total, wakes_total=lc.wakes_total,
        memory_source=lc.memory_backend.name if lc.memory_backend else "worker",
        worker_load_source=info.load_source if info else "", uptime_seconds=time.time() - lc.started_unix,
        configured_sleep_level=lc.config.sleep_level, version=VERSION, standby_pid=lc.standby.pid,
    )
    if latest is not None and latest.worker_device is not None:
        out.worker_device_bytes = latest.worker_device
    if info is not None:
        out.worker_load_seconds = info.load_seconds
        out.worker_load_phases.update(info.load_phases)
    for name in ("last_sleep", "last_wake", "last_restart"):
        if getattr(lc, name) is not None:
            getattr(out, name).CopyFrom(getattr(lc, name))
    if lc.last_ttft is not None:
        out.last_ttft_seconds = lc.last_ttft
    if lc.batch is not None and lc.worker is not None:
        out.batch.CopyFrom(lc.batch)
    if include_history:
        out.history.extend(ksleep_pb2.MemorySample(
            at_unix=s.at_unix, state=s.state, device_used_bytes=s.device_used or 0, pool_bytes=s.pool_bytes,
            **({"worker_device_bytes": s.worker_device} if s.worker_device is not None else {}))
            for s in lc.history.samples)
    return out


async def build_server(config: DaemonConfig, service: KsleepService) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
    interceptors = [ControlTokenInterceptor(config.control_token), ErrorInterceptor(on_error=service.metrics.error)]
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
    ksleep_pb2_grpc.add_KsleepServicer_to_server(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"unix:{config.unix_socket}" if config.unix_socket else config.listen
    old_umask = os.umask(0o177)  # grpc creates the unix socket here: mode 0600, only our user may connect
    try:
        port = server.add_insecure_port(address)
    finally:
        os.umask(old_umask)
    if port == 0 and not config.unix_socket:
        raise OSError(f"cannot listen on {config.listen}")
    return server, health
