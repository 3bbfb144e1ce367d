"""The Worker gRPC service: the engine behind a unix socket, for the supervisor only."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ksleep.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .engine import Engine, EngineState
from .generation import SamplingParams, prompt_from_pb

_END = object()
_STATES = {EngineState.AWAKE: common_pb2.STATE_AWAKE, EngineState.ASLEEP: common_pb2.STATE_ASLEEP,
           EngineState.CLOSED: common_pb2.STATE_STOPPED}


def device_uuid(device: torch.device) -> str:
    if device.type != "cuda" or torch.version.hip is not None:
        return ""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, max_streams: int = 64):
        self.engine = engine
        # Engine calls block (torch); they run here so the event loop keeps answering Status and health.
        self._executor = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="engine")
        self._uuid = device_uuid(engine.device)

    async def Generate(self, request: worker_pb2.WorkerGenerateRequest, context):
        params = SamplingParams.from_pb(request.params)
        prompt = prompt_from_pb(request.prompt)
        waited = max(0.0, time.time() - request.arrived_unix) if request.arrived_unix else 0.0
        started = time.perf_counter() - waited
        loop = asyncio.get_running_loop()
        ids = self.engine.encode(prompt, params.max_tokens)
        # generate() takes the engine lock, which a running forward step may hold: not on the event loop.
        stream = await loop.run_in_executor(self._executor, self.engine.generate, ids, params, started)
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:
            try:
                for event in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                    if stop.is_set():
                        break
            except BaseException as exc:  # noqa: BLE001 - re-raised on the event loop
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                stream.close()
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        loop.run_in_executor(self._executor, pump)
        first = True
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield worker_pb2.WorkerGenerateResponse(token=item.to_pb(), prompt_tokens=len(ids) if first else 0)
                first = False
        finally:
            stop.set()  # the client went away or the stream ended: let the engine thread finish

    async def Sleep(self, request: worker_pb2.WorkerSleepRequest, context) -> worker_pb2.WorkerSleepResponse:
        # Streams the supervisor just cancelled end within one decoding step: wait for them, briefly.
        result = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.sleep, request.level, 30.0)
        return worker_pb2.WorkerSleepResponse(sleep=result.to_pb())

    async def Wake(self, request: worker_pb2.WorkerWakeRequest, context) -> worker_pb2.WorkerWakeResponse:
        result = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.wake)
        return worker_pb2.WorkerWakeResponse(wake=result.to_pb())

    async def Status(self, request: worker_pb2.WorkerStatusRequest, context) -> worker_pb2.WorkerStatusResponse:
        engine = self.engine
        memory = await asyncio.get_running_loop().run_in_executor(self._executor, engine.memory)
        report = engine.load_report
        return worker_pb2.WorkerStatusResponse(
            state=_STATES[engine.state], sleep_level=engine.sleep_level, model=engine.config.model,
            device=str(engine.device), device_uuid=self._uuid, memory=memory.to_pb(), pid=os.getpid(),
            pool_name=engine.pool_name, load_source=report.pool, load_seconds=report.seconds,
            load_phases=report.phases, stable_addresses=report.stable_addresses, in_flight=engine.streams,
            context_tokens=engine.context_tokens,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
