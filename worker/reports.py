"""What load, sleep and wake report back, with a per-phase breakdown of where the time went."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ksleep.v1 import common_pb2


class Phases:
    """Wall time per named phase. Each mark waits for the device, so queued GPU work is charged to the phase
    that queued it (a synchronisation costs microseconds; the phases are few)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.started = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str, wait: bool = True) -> None:
        if wait and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


@dataclass(slots=True)
class LoadReport:
    seconds: float
    pool: str  # "created" (read from the source), "attached" (found in shared memory), "rebuilt", or "none"
    #            (started asleep without a pool: its first wake reads the source)
    pool_name: str
    weight_bytes: int
    arena_bytes: int
    stable_addresses: bool  # CUDA VMM: the arena keeps its device address across sleep/wake
    pinned: bool
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class SleepResult:
    level: int
    seconds: float
    bytes_freed: int
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_pb(self) -> common_pb2.Transition:
        return common_pb2.Transition(seconds=self.seconds, bytes=self.bytes_freed, level=self.level, at_unix=time.time(),
                                     phases=self.phases)


@dataclass(slots=True)
class WakeResult:
    seconds: float
    bytes_restored: int
    source: str  # "mirror" (one bulk copy), "source" (pool rebuilt from the model source) or "none" (was awake)
    verified: bool  # the copied bytes were checked against the manifest
    phases: dict[str, float] = field(default_factory=dict)
    level: int = 0  # the sleep level woken from
    overlapped: bool = False  # the copy was still landing when wake returned; the next forward runs behind it

    def to_dict(self) -> dict:
        return asdict(self)

    def to_pb(self) -> common_pb2.Transition:
        return common_pb2.Transition(seconds=self.seconds, bytes=self.bytes_restored, level=self.level,
                                     at_unix=time.time(), source=self.source if self.source != "none" else "",
                                     phases=self.phases, overlapped=self.overlapped)
