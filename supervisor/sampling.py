"""Memory samples: the periodic sampler and the one taken after each transition, with the serving worker's own
Status read at the same moment (its batch and KV cache figures). A failed reading leaves its figure out of the
sample, never the sample out.

A mixin of Lifecycle (lifecycle.py), which owns the state these methods read and set.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from ksleep.v1 import worker_pb2
from ksleep.worker.poolfiles import data_path

from .monitor import DeviceMemory
from .workers import STATUS_DEADLINE

log = logging.getLogger("ksleep.lifecycle")


class Sampling:
    async def _sample_loop(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # noqa: BLE001 - one failed sample is logged; sampling goes on
                log.exception("a memory sample failed")
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
            try:
                memory = await asyncio.to_thread(self.memory_backend.read, self.worker.pid if self.worker else None)
            except Exception as exc:  # noqa: BLE001 - e.g. an NVML error: this sample has no figure, not no answer
                log.warning("reading device memory (%s) failed: %s", self.memory_backend.name, exc)
        if memory is None and info is not None:
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
        worker.answered = time.monotonic()  # the watchdog need not ping it now
        self.batch = info.batch if info.HasField("batch") else None
        return info

    def pool_bytes(self) -> int:
        if self.worker_info is None:
            return 0
        path = data_path(self.config.shm_dir, self.worker_info.pool_name)
        return path.stat().st_size if path.exists() else 0
