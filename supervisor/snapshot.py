"""One reading of the daemon's state, taken at one moment: what Status, the metrics, the HTTP face and the gRPC
health service all report (so that they never disagree, and none of them reads the lifecycle's fields itself)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from ksleep.v1 import common_pb2, ksleep_pb2, worker_pb2

from .monitor import Sample

S = common_pb2
# states in which a request is served (at once, or after the wake it starts); in the others (a worker loading
# after a crash, or none) it waits or fails, and the health check says NOT_SERVING
SERVING_STATES = (S.STATE_AWAKE, S.STATE_ASLEEP, S.STATE_SLEEPING, S.STATE_WAKING)

try:
    VERSION = version("ksleep")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0+source"


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: int
    sleep_level: int
    stopping: bool
    model: str
    device: str  # the worker's device, else the configured one
    worker_info: worker_pb2.WorkerStatusResponse | None  # the serving worker's Status when it was adopted
    worker_pid: int  # 0: none
    standby_pid: int
    restarts: int
    sleeps_total: int
    wakes_total: int
    in_flight: int
    idle_seconds: float
    idle_timeout: float
    configured_sleep_level: int
    last_sleep: common_pb2.Transition | None
    last_wake: common_pb2.Transition | None
    last_restart: common_pb2.Transition | None
    last_ttft: float | None
    latest: Sample | None  # the last memory sample
    samples: tuple[Sample, ...]  # the memory history, only when asked for (Status(include_history))
    batch: common_pb2.BatchStats | None  # the worker's batch and KV cache, as last sampled (None: unknown)
    pool_bytes: int
    memory_source: str
    uptime_seconds: float
    weights: common_pb2.WeightsVersion  # what the model computes with (UpdateWeights)

    @property
    def serving(self) -> bool:
        """Whether a request sent now will be served (the health check's answer)."""
        return not self.stopping and self.state in SERVING_STATES

    @property
    def asleep(self) -> bool:
        return self.state in (S.STATE_ASLEEP, S.STATE_SLEEPING)

    def to_pb(self) -> ksleep_pb2.StatusResponse:
        info, latest = self.worker_info, self.latest
        out = ksleep_pb2.StatusResponse(
            state=self.state, sleep_level=self.sleep_level, model=self.model, device=self.device,
            weight_bytes=info.memory.weight_bytes if info else 0,
            device_used_bytes=(latest.device_used or 0) if latest else 0,  # 0 (unset): no reading
            device_total_bytes=info.memory.device_total_bytes if info else 0, pool_bytes=self.pool_bytes,
            worker_pid=self.worker_pid, restarts=self.restarts, in_flight=self.in_flight,
            idle_seconds=self.idle_seconds, idle_timeout_seconds=self.idle_timeout,
            sleeps_total=self.sleeps_total, wakes_total=self.wakes_total, memory_source=self.memory_source,
            worker_load_source=info.load_source if info else "", pool_format=info.pool_format if info else "", uptime_seconds=self.uptime_seconds,
            configured_sleep_level=self.configured_sleep_level, version=VERSION, standby_pid=self.standby_pid,
        )
        if latest is not None and latest.worker_device is not None:
            out.worker_device_bytes = latest.worker_device
        if info is not None:
            out.worker_load_seconds = info.load_seconds
            out.worker_load_phases.update(info.load_phases)
        for name in ("last_sleep", "last_wake", "last_restart"):
            if getattr(self, name) is not None:
                getattr(out, name).CopyFrom(getattr(self, name))
        if self.last_ttft is not None:
            out.last_ttft_seconds = self.last_ttft
        if self.batch is not None:
            out.batch.CopyFrom(self.batch)
        out.weights.CopyFrom(self.weights)
        if self.samples:
            out.history.extend(ksleep_pb2.MemorySample(
                at_unix=s.at_unix, state=s.state, device_used_bytes=s.device_used or 0, pool_bytes=s.pool_bytes,
                **({"worker_device_bytes": s.worker_device} if s.worker_device is not None else {}))
                for s in self.samples)
        return out


def take(lc, history: bool = False) -> Snapshot:
    """The snapshot of Lifecycle `lc` now (lifecycle.py's `snapshot()`); the memory history is copied only with
    `history`."""
    info = lc.worker_info
    samples = lc.history.samples
    return Snapshot(
        state=lc.state, sleep_level=lc.sleep_level, stopping=lc.stopping, model=lc.config.name,
        device=info.device if info else lc.config.device, worker_info=info,
        worker_pid=lc.worker.pid if lc.worker else 0, standby_pid=lc.standby.pid, restarts=lc.restarts,
        sleeps_total=lc.sleeps_total, wakes_total=lc.wakes_total, in_flight=lc.in_flight,
        idle_seconds=lc.idle_seconds(), idle_timeout=lc.config.idle_timeout,
        configured_sleep_level=lc.config.sleep_level, last_sleep=lc.last_sleep, last_wake=lc.last_wake,
        last_restart=lc.last_restart, last_ttft=lc.last_ttft, latest=samples[-1] if samples else None,
        samples=tuple(samples) if history else (), batch=lc.batch if lc.worker is not None else None, pool_bytes=lc.pool_bytes(),
        memory_source=lc.memory_backend.name if lc.memory_backend else "worker",
        uptime_seconds=time.time() - lc.started_unix, weights=common_pb2.WeightsVersion(
            number=lc.weights.number, source=lc.weights.source))
