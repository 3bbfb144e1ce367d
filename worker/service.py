"""The Worker gRPC service: the engine behind a unix socket, for the supervisor only."""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

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


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, engine_thread: ThreadPoolExecutor):
        self.engine = engine
        # Every torch call runs on this one thread, token by token, so that concurrent streams interleave
        # without one CUDA/cuBLAS handle and workspace per thread (measured: +1.3 GB over 15 soak cycles with a
        # pool of threads), and the event loop keeps answering Status and health meanwhile.
        self._thread = engine_thread
        self._uuid = device_uuid(engine.device)
        self._open = 0
        self._closed = asyncio.Condition()

    async def _on_engine(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context):
        params = SamplingParams.from_pb(request.params)
        prompt = prompt_from_pb(request.prompt)
        waited = max(0.0, time.time() - request.arrived_unix) if request.arrived_unix else 0.0
        started = time.perf_counter() - waited
        ids = self.engine.encode(prompt, params.max_tokens)
        stream = await self._on_engine(self.engine.generate, ids, params, started)
        self._open += 1
        try:
            first = True
            while (event := await self._on_engine(next, stream, None)) is not None:
                yield worker_pb2.WorkerGenerateResponse(token=event.to_pb(), prompt_tokens=len(ids) if first else 0)
                first = False
        finally:  # finished, failed, or the supervisor cancelled the call
            await asyncio.shield(self._on_engine(stream.close))
            self._open -= 1
            async with self._closed:
                self._closed.notify_all()

    async def Sleep(self, request: worker_pb2.WorkerSleepRequest, context) -> worker_pb2.WorkerSleepResponse:
        # Streams the supervisor just cancelled close within one decoding step: wait for them (on the event
        # loop: the engine thread must stay free to close them), then sleep.
        async with self._closed:
            try:
                await asyncio.wait_for(self._closed.wait_for(lambda: self._open == 0), 30)
            except asyncio.TimeoutError:
                pass  # engine.sleep refuses with BusyError, naming the streams
        result = await self._on_engine(self.engine.sleep, request.level)
        return worker_pb2.WorkerSleepResponse(sleep=result.to_pb())

    async def Wake(self, request: worker_pb2.WorkerWakeRequest, context) -> worker_pb2.WorkerWakeResponse:
        result = await self._on_engine(self.engine.wake, request.overlap)
        return worker_pb2.WorkerWakeResponse(wake=result.to_pb())

    async def Status(self, request: worker_pb2.WorkerStatusRequest, context) -> worker_pb2.WorkerStatusResponse:
        engine = self.engine
        memory = await self._on_engine(engine.memory)
        report = engine.load_report
        return worker_pb2.WorkerStatusResponse(
            state=_STATES[engine.state], sleep_level=engine.sleep_level, model=engine.config.model,
            device=str(engine.device), device_uuid=self._uuid, memory=memory.to_pb(), pid=os.getpid(),
            pool_name=engine.pool_name, load_source=report.pool, load_seconds=report.seconds,
            load_phases=report.phases, stable_addresses=report.stable_addresses, in_flight=engine.streams,
            context_tokens=engine.context_tokens,
        )

