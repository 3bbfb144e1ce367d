"""The public gRPC face of ksleepd: the Ksleep service, grpc.health.v1 and server reflection."""
from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc, worker_pb2
from ksleep.worker.errors import KsleepError, ValidationError
from ksleep.worker.generation import SamplingParams, check_request, prompt_from_pb
from ksleep.worker.interceptor import ErrorInterceptor
from ksleep.worker.limits import PAD_TOKENS
from ksleep.worker.names import finish_name

from .auth import ControlTokenInterceptor
from .config import DaemonConfig
from .lifecycle import Lifecycle, SleepAbortedError, WorkerAsleepError, WorkerGoneError
from .metrics import Metrics
from .registry import ModelRegistry

log = logging.getLogger("ksleep.server")
SERVICE = ksleep_pb2.DESCRIPTOR.services_by_name["Ksleep"].full_name
LIVE, READY = "live", "ready"  # health service names for orchestrators' liveness and readiness probes
MAX_MESSAGE = 16 << 20  # bytes; a prompt beyond the context is refused by the worker anyway
ASLEEP_CODES = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS)
RETRIES = 2  # times a request is replayed on a new worker when its worker died before its first token

class StalledClientError(KsleepError):
    """A stream's client stopped reading: its request was cancelled once --stream-backlog tokens waited."""

    status = "RESOURCE_EXHAUSTED"


class KsleepService(ksleep_pb2_grpc.KsleepServicer):
    """The public API; the HTTP face calls the same methods (with context=None)."""

    def __init__(self, models: ModelRegistry | Lifecycle, metrics: Metrics):
        self.models = models if isinstance(models, ModelRegistry) else ModelRegistry([models])
        self.metrics = metrics

    @property
    def lifecycle(self) -> Lifecycle:
        """The default (first) model's."""
        return self.models.default

    async def Generate(self, request: ksleep_pb2.GenerateRequest, context):
        arrived = time.time()
        lifecycle = self.models.route(request.model)
        self.check(request, lifecycle)  # before admission: a request refused here never wakes, spawns or queues anything
        # The worker's tokens go through a bounded buffer: a client that stops reading fills it, and the request
        # is then cancelled and its ticket returned (it holds up no sleep), instead of stalling on the write.
        backlog: asyncio.Queue = asyncio.Queue()  # bounded by _pump (the end marker must always fit)
        pump = asyncio.create_task(self._pump(request, arrived, backlog, lifecycle))
        try:
            while True:
                message = await backlog.get()
                if message is None:
                    break
                yield message
            await pump  # raises what ended the request
        finally:
            pump.cancel()

    async def _pump(self, request: ksleep_pb2.GenerateRequest, arrived: float, backlog: asyncio.Queue,
                    lifecycle: Lifecycle) -> None:
        limit = lifecycle.config.stream_backlog
        try:
            for attempt in range(RETRIES + 1):
                sent = 0
                async with lifecycle.admit(arrived) as ticket:
                    try:
                        async for message in self._relay(request, ticket, lifecycle):
                            sent += 1
                            if backlog.qsize() >= limit:
                                raise StalledClientError(f"cancelled: the client left {limit} tokens unread "
                                                         f"(--stream-backlog)")
                            backlog.put_nowait(message)
                        return
                    except (WorkerGoneError, WorkerAsleepError) as exc:
                        # A worker that died (or fell asleep by itself) before this request's first token: the
                        # request is retried, unseen, on its successor (or after one wake). Once tokens have
                        # left, the client must see the error.
                        if sent or attempt == RETRIES:
                            raise
                        log.warning("%s before the first token; retrying the request", exc)
        finally:
            backlog.put_nowait(None)  # the end: the reader then gets what ended the request (after what it holds)

    def check(self, request: ksleep_pb2.GenerateRequest, lifecycle: Lifecycle | None = None) -> None:
        """Everything that can be checked without the model (ValidationError): the parameters, the prompt's shape
        and size, and its length against the context and the KV cache the worker last reported."""
        prompt, params = prompt_from_pb(request.prompt), SamplingParams.from_pb(request.params)
        info = (lifecycle or self.lifecycle).worker_info
        cache = info.batch.kv_cache_tokens - PAD_TOKENS if info is not None and info.HasField("batch") else None
        check_request(prompt, params, info.context_tokens if info is not None else None, cache)

    async def _relay(self, request: ksleep_pb2.GenerateRequest, ticket, lifecycle: Lifecycle):
        call = ticket.worker.stub.Generate(worker_pb2.WorkerGenerateRequest(
            prompt=request.prompt, params=request.params, arrived_unix=ticket.arrived_unix))
        ticket.call = call
        prompt_tokens = completion = 0
        ttft = None
        weights = None
        gaps, last_at = [], None
        try:
            async for response in call:
                token = response.token
                prompt_tokens = prompt_tokens or response.prompt_tokens
                if weights is None:
                    weights = response.weights  # on the first message: the request's weights throughout
                completion += 1
                now = time.perf_counter()
                if last_at is not None:
                    gaps.append(now - last_at)  # inter-token latency, as the client sees it leave
                last_at = now
                if ttft is None:
                    ttft = ticket.first_token_seconds = token.elapsed_seconds
                message = ksleep_pb2.GenerateResponse(token=token)
                if token.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    total = time.time() - ticket.arrived_unix
                    message.summary.CopyFrom(ksleep_pb2.GenerateSummary(
                        prompt_tokens=prompt_tokens, completion_tokens=completion, ttft_seconds=ttft,
                        total_seconds=total, woke=ticket.woke, weights=weights))
                    self.metrics.request_done(lifecycle.config.name, ttft, total, gaps, prompt_tokens, completion,
                                              finish_name(token.finish_reason), lifecycle.replica)
                yield message
        except BaseException as exc:
            # A cancelled worker call raises CancelledError: ours when SLEEP_MODE_ABORT did it.
            if ticket.aborted and not isinstance(exc, GeneratorExit):
                raise SleepAbortedError("cancelled: the model was put to sleep with SLEEP_MODE_ABORT") from exc
            # refused as asleep, or its pool failed a checksum and the rebuild failed too (asleep at level 2)
            if (isinstance(exc, grpc.aio.AioRpcError) and exc.code() in ASLEEP_CODES
                    and await lifecycle.reconcile(ticket.worker, ticket.wakes)):
                raise WorkerAsleepError("the worker was asleep") from exc
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE or (
                    isinstance(exc, Exception) and ticket.worker.exited.done()):
                if await lifecycle.worker_died(ticket.worker):
                    raise WorkerGoneError("the worker died during this request; it is being restarted") from exc
            raise
        finally:
            call.cancel()  # the client went away: stop the worker's stream too

    async def Sleep(self, request: ksleep_pb2.SleepRequest, context) -> ksleep_pb2.SleepResponse:
        level = request.level if request.HasField("level") else None
        if level is not None and level not in (1, 2, 3):
            raise ValidationError(f"sleep level must be 1, 2 or 3, got {level}")
        targets = [self.models.get(request.model)] if request.model else list(self.models)  # empty: all
        results = [await lc.sleep(level, request.mode) for lc in targets]
        return ksleep_pb2.SleepResponse(sleep=results[0][0], aborted_requests=sum(a for _, a in results))

    async def WakeUp(self, request: ksleep_pb2.WakeUpRequest, context) -> ksleep_pb2.WakeUpResponse:
        return ksleep_pb2.WakeUpResponse(wake=await self.models.get(request.model).wake())  # (its first replica)

    async def UpdateWeights(self, request: ksleep_pb2.UpdateWeightsRequest, context) -> ksleep_pb2.UpdateWeightsResponse:
        replicas = self.models.replicas[self.models.get(request.model).config.name]
        replies = [await lc.update_weights(request.directory, request.mode) for lc in replicas]
        return replies[0]  # (each replica swaps to the one new pool: the first built it, the others attach)

    async def Status(self, request: ksleep_pb2.StatusRequest, context) -> ksleep_pb2.StatusResponse:
        chosen = self.models.get(request.model)
        for lc in self.models:
            await lc.sample()  # figures of now, not of the last periodic sample
        return status_message(self.models, request.include_history, chosen)


def status_message(models: ModelRegistry | Lifecycle, include_history: bool = False,
                   chosen: Lifecycle | None = None) -> ksleep_pb2.StatusResponse:
    """The status of `chosen` (the default model), and with several models every model's under `models`."""
    if isinstance(models, Lifecycle):
        return models.snapshot(include_history).to_pb()
    out = (chosen or models.default).snapshot(include_history).to_pb()
    if len(list(models)) > 1:
        out.models.extend(lc.snapshot().to_pb() for lc in models)  # every model, every replica
        out.model_switches = models.switches
        out.scale_outs = models.scale_outs
    return out


class LifecycleHealth(health_aio.HealthServicer):
    """grpc.health.v1 that tells the truth: SERVING while a request would be served (awake, or asleep and able
    to wake), NOT_SERVING while the worker is down or restarting and once shutting down; for "", the Ksleep
    service and "ready" alike. "live" is SERVING while the daemon answers at all (until it shuts down). Check
    reads the lifecycle's snapshot; Watch follows its state changes."""

    def __init__(self, lifecycle: Lifecycle):
        super().__init__()
        self._lifecycle = lifecycle
        self._shutting_down = False
        lifecycle.on_state(lambda _: asyncio.ensure_future(self.refresh()))

    def _status(self) -> int:
        serving = self._lifecycle.snapshot().serving and not self._shutting_down
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    def _live(self) -> int:
        return health_pb2.HealthCheckResponse.NOT_SERVING if self._shutting_down else health_pb2.HealthCheckResponse.SERVING

    async def refresh(self) -> None:
        """Tell the watchers the status of now."""
        status = self._status()
        for name in ("", SERVICE, READY):
            await self.set(name, status)
        await self.set(LIVE, self._live())

    async def Check(self, request, context):
        if request.service == LIVE:  # liveness: the daemon answers (restart it when it does not)
            return health_pb2.HealthCheckResponse(status=self._live())
        if request.service not in ("", SERVICE, READY):
            return await super().Check(request, context)  # NOT_FOUND
        return health_pb2.HealthCheckResponse(status=self._status())

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        await super().enter_graceful_shutdown()


async def build_server(config: DaemonConfig, service: KsleepService) -> tuple[grpc.aio.Server, LifecycleHealth]:
    interceptors = [ControlTokenInterceptor(config.control_token), ErrorInterceptor(on_error=service.metrics.error)]
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
    ksleep_pb2_grpc.add_KsleepServicer_to_server(service, server)
    health = LifecycleHealth(service.lifecycle)
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
