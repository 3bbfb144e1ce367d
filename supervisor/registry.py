"""The models one daemon serves: a Lifecycle each (own worker, pool, idle timeout), and who may be awake.

A request names its model (the first is the default). A model that must wake while `--max-awake` models are
awake, or while the device has no room for it beside them, first puts the least recently used awake model to
sleep at level 1 (its requests in flight finish first, for at most its --drain-timeout; requests that arrive for
it meanwhile wait for its next wake): a switch is one sleep plus one wake, never a reload while the pool exists.
Switches run one at a time. A model may have several replicas (workers on several devices, or several on one),
all attached to its one pool: requests go to the least loaded awake replica, a replica sleeps on its own idle
timeout, and under load a sleeping one wakes (`route`). A single model is a registry of one.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from ksleep.v1 import common_pb2, ksleep_pb2
from ksleep.worker.errors import ValidationError

from .config import DaemonConfig
from .lifecycle import Lifecycle
from .metrics import Metrics

log = logging.getLogger("ksleep.registry")
S = common_pb2


class UnknownModelError(ValidationError):
    """A request for a model this daemon does not serve (INVALID_ARGUMENT; 404 on the HTTP face)."""


class ModelRegistry:
    def __init__(self, lifecycles: list[Lifecycle], max_awake: int = 0):
        self.replicas: dict[str, list[Lifecycle]] = {}  # per model, its workers (one per device, or several on one)
        for lc in lifecycles:
            group = self.replicas.setdefault(lc.config.name, [])
            lc.replica = len(group)  # (vLLM's `engine` label)
            group.append(lc)
        self.default = lifecycles[0]
        self.max_awake = max_awake
        self._switching = asyncio.Lock()
        self.switches = 0  # models put to sleep to make room for another
        self.scale_outs = 0  # sleeping replicas woken because every awake one was busy
        for lc in lifecycles:  # (replicas of one model sit on their own devices: they wake in parallel)
            lc.switch = self._switch_in if len(self.replicas) > 1 else None

    @property
    def lifecycles(self) -> dict[str, Lifecycle]:
        """Each model's first replica, by name."""
        return {name: group[0] for name, group in self.replicas.items()}

    @classmethod
    def from_config(cls, config: DaemonConfig, metrics: Metrics | None = None) -> ModelRegistry:
        metrics = metrics or Metrics()
        return cls([Lifecycle(c, metrics, tag=i) for i, c in enumerate(config.model_configs())], config.max_awake)

    @property
    def metrics(self) -> Metrics:
        return self.default.metrics

    def get(self, name: str | None) -> Lifecycle:
        """The model called `name` (the default for None or ""); UnknownModelError naming those served."""
        return self._group(name)[0]

    def _group(self, name: str | None) -> list[Lifecycle]:
        if not name:
            return self.replicas[self.default.config.name]
        group = self.replicas.get(name)
        if group is None:
            raise UnknownModelError(f"model {name!r} is not served here; served: {', '.join(self.replicas)}")
        return group

    def route(self, name: str | None) -> Lifecycle:
        """The replica of model `name` a new request goes to: the least loaded awake one, unless every awake one
        has --scale-out-at requests in flight and one sleeps (scale-out is a wake); none awake: one that is
        waking, else the first asleep. The validation of `name` is get()'s."""
        group = self._group(name)
        if len(group) == 1:
            return group[0]
        awake = [lc for lc in group if lc.state == S.STATE_AWAKE]
        asleep = [lc for lc in group if lc.state == S.STATE_ASLEEP]
        if awake:
            least = min(awake, key=lambda lc: lc.in_flight)
            limit = least.config.scale_out_at or least.config.max_batch
            if least.in_flight >= limit and asleep:
                self.scale_outs += 1
                log.info("every awake replica of %s has %d+ requests: waking another", least.config.name, limit)
                return asleep[0]
            return least
        waking = [lc for lc in group if lc.state in (S.STATE_WAKING, S.STATE_LOADING)]
        return min(waking, key=lambda lc: lc.in_flight) if waking else (asleep or group)[0]

    def __iter__(self):
        return (lc for group in self.replicas.values() for lc in group)

    # -- start and stop -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every model in order, each awake once (so that each builds or attaches its pool), making room
        as a wake would."""
        for lc in self:
            async with self._switching:
                await self._make_room(lc)
                await lc.start()

    async def stop(self) -> None:
        for lc in reversed(list(self)):
            await lc.stop()

    # -- switching ------------------------------------------------------------------------------------------
    async def _switch_in(self, lc: Lifecycle, overlap: bool) -> None:
        async with self._switching:
            await self._make_room(lc)
            try:
                await lc._wake(overlap)
            except grpc.aio.AioRpcError as exc:  # no device memory beside the others: one more goes to sleep
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or not await self._evict(lc):
                    raise
                await lc._wake(overlap)

    async def _make_room(self, lc: Lifecycle) -> None:
        while self.max_awake and len(self._awake(but=lc)) >= self.max_awake:
            if not await self._evict(lc):
                return

    def _awake(self, but: Lifecycle) -> list[Lifecycle]:
        return [o for o in self if o is not but and o.state in (S.STATE_AWAKE, S.STATE_WAKING)]

    async def _evict(self, lc: Lifecycle) -> bool:
        """Put the least recently used other awake model to sleep (idle ones first); False when there is none."""
        awake = self._awake(but=lc)
        if not awake:
            return False
        victim = min(awake, key=lambda o: (o.in_flight > 0, o._last_activity))
        log.info("putting %s to sleep to make room for %s", victim.config.name, lc.config.name)
        await victim.sleep(1, ksleep_pb2.SLEEP_MODE_WAIT)
        self.switches += 1
        return True
