"""The Worker gRPC service: the engine behind a unix socket, for the supervisor only."""
from __future__ import annotations

import asyncio
import os
import time
import torch

from ksleep.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .engine import Engine, EngineState
from .generation import SamplingParams, prompt_from_pb

_STATES = {EngineState.AWAKE: common_pb2.STATE_AWAKE, EngineState.ASLEEP: common_pb2.STATE_ASLEEP,
           EngineState.CLOSED: common_pb2.STATE_STOPPED}


def device_uuid(device: torch.device) -> str:
    if device.type != "cuda" or torch.version.hip is not None:
        return ""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def batch_pb(engine: Engine) -> common_pb2.BatchStats:
    stats = engine.stats()
    return common_pb2.BatchStats(
        running=stats.running, waiting=stats.waiting, kv_cache_bytes=engine.kv_cache.nbytes,
        kv_cache_tokens=stats.kv_tokens, kv_used_tokens=stats.kv_used_tokens, max_batch=stats.batch_limit,
        max_queue=stats.queue_limit, steps=stats.steps, generated_tokens=stats.tokens, attention=engine.attention,
        cuda_graphs=engine.runner.graphs_enabled, graphs_captured=engine.runner.captures,
        kv_mapped_bytes=engine.weights.arena.scratch_bytes, fused=engine.runner.fused)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """The engine batches every Generate it is given on its own thread; this side only converts messages and
    waits (sleep, wake and memory readings run in worker threads so that the event loop keeps streaming)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._uuid = device_uuid(engine.device)
        self._open = 0
        self._closed = asyncio.Condition()

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context):
        params = SamplingParams.from_pb(request.params)
        prompt = prompt_from_pb(request.prompt)
        waited = max(0.0, time.time() - request.arrived_unix) if request.arrived_unix else 0.0
        started = time.perf_counter() - waited
        # tokenizing a long prompt takes a while: off the event loop, which streams every other request's tokens
        stream = await asyncio.to_thread(self.engine.generate, prompt, params, started, asyncio.get_running_loop())
        self._open += 1
        try:
            first = True
            async for event in stream:
                if first:
                    # read at the first token: weights are swapped only with no request in the batch (update.py)
                    yield worker_pb2.WorkerGenerateResponse(token=event.to_pb(), prompt_tokens=stream.prompt_tokens,
                                                            weights=self.engine.weights_version.to_pb())
                else:
                    yield worker_pb2.WorkerGenerateResponse(token=event.to_pb())
                first = False
        finally:  # finished, failed, or the supervisor cancelled the call: the request leaves the batch
            stream.close()
            self._open -= 1
            async with self._closed:
                self._closed.notify_all()

    async def Sleep(self, request: worker_pb2.WorkerSleepRequest, context) -> worker_pb2.WorkerSleepResponse:
        # Streams the supervisor just cancelled leave the batch at the next step: wait for them, then sleep.
        async with self._closed:
            try:
                await asyncio.wait_for(self._closed.wait_for(lambda: self._open == 0), 30)
            except asyncio.TimeoutError:
                pass  # engine.sleep refuses with BusyError, naming the requests
        result = await asyncio.to_thread(self.engine.sleep, request.level)
        return worker_pb2.WorkerSleepResponse(sleep=result.to_pb())

    async def Wake(self, request: worker_pb2.WorkerWakeRequest, context) -> worker_pb2.WorkerWakeResponse:
        result = await asyncio.to_thread(self.engine.wake, request.overlap, request.waiting_requests)
        return worker_pb2.WorkerWakeResponse(wake=result.to_pb())

    async def Status(self, request: worker_pb2.WorkerStatusRequest, context) -> worker_pb2.WorkerStatusResponse:
        engine = self.engine
        # device memory queries need no engine thread (they create no cuBLAS state) and must not wait for a step
        memory = await asyncio.to_thread(engine.memory)
        report = engine.load_report
        return worker_pb2.WorkerStatusResponse(
            state=_STATES[engine.state], sleep_level=engine.sleep_level, model=engine.config.model,
            device=str(engine.device), device_uuid=self._uuid, memory=memory.to_pb(), pid=os.getpid(),
            pool_name=engine.pool_name, load_source=report.pool, load_seconds=report.seconds,
            load_phases=report.phases, stable_addresses=report.stable_addresses, in_flight=engine.streams,
            context_tokens=engine.context_tokens, batch=batch_pb(engine), weights=engine.weights_version.to_pb(),
            pool_format=engine.weights.pool_format,
        )

    async def UpdateWeights(self, request: worker_pb2.WorkerUpdateWeightsRequest, context):
        # the new pool is built in a thread while the engine goes on serving (and this loop answers pings)
        result = await asyncio.to_thread(self.engine.update_weights, request.directory, request.abort)
        return result.to_pb()
