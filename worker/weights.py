"""The weights' life: the device arena, the shared-memory pool that mirrors it, and every fill, check and rebuild.

    weights.bring_up(awake=True)   attach to the pool (or build it from the model source), fill the arena, bind
    weights.sleep(1)               release the arena; level 2 drops the pool too
    weights.wake(overlap=True)     one bulk copy from the pinned pool, queued; the next forward runs behind it
    weights.settle()               after that forward: its checksums; a corrupt pool is rebuilt from the source

Called on the engine thread only (engine.py), between steps.
"""
from __future__ import annotations

import enum
import logging
import time

import torch

from . import compressed, faults
from .arena import Block, DeviceArena
from .config import WorkerConfig
from .errors import ClosedError, PoolCorruptError
from .fill import ArenaFill
from .gate import LayerGate
from .layout import ArenaLayout
from .memory import MemoryReport, measure
from .pool import PoolManifest, WeightPool, pool_name
from .poolfiles import remove_pool_files
from .reports import Phases, SleepResult, WakeResult
from .skeleton import ModelSkeleton
from .staging import StagingRing

log = logging.getLogger(__name__)


class WeightState(str, enum.Enum):
    AWAKE = "awake"
    ASLEEP = "asleep"
    CLOSED = "closed"


class WeightStore:
    def __init__(self, config: WorkerConfig, device: torch.device, source, skeleton: ModelSkeleton,
                 layout: ArenaLayout, arena: DeviceArena, phases: Phases):
        self.config, self.device, self.source = config, device, source
        self.skeleton, self.layout, self.arena = skeleton, layout, arena
        self.pool_format = compressed.resolve(config.pool_format, device, config.torch_dtype)
        self.pool_name = pool_name(config.pool_prefix, source, config.torch_dtype, layout, self.pool_format)
        self.pool: WeightPool | None = None
        self._expected: torch.Tensor | None = None  # the manifest's block sums, on the device
        self._last_restore_verified = False
        self._pool_verified = False  # the attached pool passed a checksum at least once
        self._staging: StagingRing | None = None
        self._fill: ArenaFill | None = None  # a restore still in flight behind the forward (overlapped wake)
        self._gate = LayerGate(skeleton.model, layout)
        self.phases = phases
        self.state = WeightState.ASLEEP
        self.sleep_level = 0

    # -- bringing up --------------------------------------------------------------------------------------------
    def bring_up(self, awake: bool) -> str:
        """Attach to the pool or build it, then (awake) fill the arena and bind the model; returns how the weights
        came: "created", "attached", "rebuilt", or "none" (asleep without a pool: its first wake reads the source)."""
        try:
            self.pool = WeightPool.open(self.config.shm_dir, self.pool_name)
        except PoolCorruptError as exc:
            log.warning("%s; rebuilding the pool", exc)
            remove_pool_files(self.config.shm_dir, self.pool_name, in_use_too=True)
        how = "attached" if self.pool is not None else "created"
        if not awake:
            if self.pool is None:  # nothing to attach to (a level-2 sleep dropped it): asleep as at level 2
                self.state, self.sleep_level = WeightState.ASLEEP, 2
                return "none"
            if self.device.type == "cuda":  # verified on the first wake
                self.pool.pin(self.device)
            self.state, self.sleep_level = WeightState.ASLEEP, 1
            return how
        blocks = self.arena.allocate()
        self.phases.mark("allocate")
        source = self._restore(blocks, overlap=True)
        self.state, self.sleep_level = WeightState.AWAKE, 0
        return "rebuilt" if how == "attached" and source == "source" else how

    def _build_pool(self) -> WeightPool:
        """A new, unpublished raw pool filled from the model source (checkpoint reads or synthetic draws)."""
        pool = WeightPool.create(self.config.shm_dir, self.pool_name, self.layout.total_bytes)
        self.phases.mark("create_pool")
        try:
            self.write_weights(self.source, pool.tensor)
            self.phases.mark("read_source")
            if self.device.type == "cuda":  # after the fill: pinning pages already written is ~3x faster
                pool.pin(self.device)
                pool.wait_pinned()
                self.phases.mark("pin")
        except BaseException:
            pool.discard()
            raise
        return pool

    def write_weights(self, source, host: torch.Tensor) -> None:
        """The arena's bytes of `source`'s weights (and the model's buffers) into `host`, laid out as the arena."""
        params = [s for s in self.layout.slots if s.kind == "param"]
        source.write_weights(params, host, self.device, self.config.load_threads)
        by_name = {s.name: s for s in self.layout.slots}
        for name, value in self.skeleton.buffer_values().items():
            by_name[name].view(host).copy_(value)

    def _build_compressed(self, blocks: list[Block]) -> str:
        """Read the source into ordinary host memory, fill the arena from it, code the arena where it lives and
        write the compressed pool; the model is bound to the arena."""
        host = torch.zeros(self.layout.total_bytes, dtype=torch.uint8)  # (the padding between slots: zeros)
        self.write_weights(self.source, host)
        self.phases.mark("read_source")
        self.arena.fill(host, blocks, staging=self._staging_for(None)).finish()
        del host
        self.phases.mark("copy")
        self._expected = self.arena.checksums()
        self.pool = compressed.write_pool(self.config.shm_dir, self.pool_name, self.source.identity,
                                          str(self.config.torch_dtype), self.layout, self._expected.cpu().numpy(),
                                          self.arena.chunk_bytes, self.device, pin=True)
        self.phases.mark("encode")  # (coding, writing and pinning the pool)
        self.skeleton.bind(self.arena.views())
        self._last_restore_verified = self._pool_verified = True
        return "source"

    def _restore(self, blocks: list[Block], overlap: bool = False) -> str:
        """Copy `blocks` from the pool into the arena (building the pool first if there is none), verify, bind.
        With `overlap`, return once the copy is queued: the next forward runs behind it, layer by layer, and the
        verification is settled after that forward (see settle). (On CPU the copy is done by then; only the
        verification waits for the forward.)"""
        if self.pool is None:
            if self.pool_format == compressed.COMPRESSED:
                return self._build_compressed(blocks)
            self.pool = self._build_pool()
        pool = self.pool
        if pool.manifest is None:  # just built: checksum on the device, then publish
            self.arena.fill(pool.tensor, blocks).finish()
            self.phases.mark("copy")
            self._expected = self.arena.checksums()
            pool.publish(PoolManifest(self.pool_name, self.source.identity, str(self.config.torch_dtype),
                                      self.layout, self._expected.cpu().numpy(), time.time()))
            self.skeleton.bind(self.arena.views())
            self.phases.mark("checksum_publish_bind")
            self._last_restore_verified = self._pool_verified = True
            return "source"
        try:
            pool.check_intact()
            if self._expected is None:  # a pool's manifest is read once, when it is opened
                if pool.manifest.identity != self.source.identity or pool.manifest.layout != self.layout:
                    raise PoolCorruptError(f"{pool.path} was made for another model or layout")
                if pool.manifest.format != self.pool_format:
                    raise PoolCorruptError(f"{pool.path} is a {pool.manifest.format} pool, not {self.pool_format}")
                self._expected = torch.from_numpy(pool.manifest.block_sums).to(self.device)
        except PoolCorruptError as exc:
            return self._rebuild(exc)
        verify = self.config.verify_on_wake or not self._pool_verified  # always the first time
        coded = compressed.chunk_entries(pool.manifest.chunks) if pool.manifest.format == compressed.COMPRESSED else None
        fill = self.arena.fill(pool.tensor, blocks, self._expected if verify else None, self._staging_for(pool), coded)
        self.skeleton.bind(self.arena.views())  # host-side work while the copy runs
        self._last_restore_verified = verify
        self._fill = fill
        if overlap:
            self._gate.arm(fill)
            self.phases.mark("queue_copy", wait=False)
            return "mirror"
        self.settle()
        self.phases.mark("copy_verify_bind")
        return "mirror" if self.pool is pool else "source"

    @property
    def filling(self) -> bool:
        """A restore is still landing: the next forward must run eagerly (its layers wait for their weights),
        and `settle` must follow it."""
        return self._fill is not None

    def settle(self) -> bool:
        """Finish the restore in flight, if any: order the compute stream after it and check its checksums. A
        corrupt pool is dropped and the weights are rebuilt from the source; returns True then, because whatever
        ran behind the copy read bad weights and must be run again."""
        fill, self._fill = self._fill, None
        if fill is None:
            return False
        self._gate.disarm()
        try:
            fill.finish()
        except PoolCorruptError as exc:
            try:
                self._rebuild(exc)
            except BaseException:  # no good weights to serve: asleep, and the next wake reloads the source
                self.skeleton.unbind()
                self.arena.release()
                self.state, self.sleep_level = WeightState.ASLEEP, 2
                raise
            return True
        self._pool_verified = self._pool_verified or fill.verified
        if self.device.type == "cuda" and self.pool is not None:
            # no-op once started; begun only now so that it does not slow a staged copy that reads the same pages
            self.pool.pin(self.device)
        return False

    def _rebuild(self, exc: PoolCorruptError) -> str:
        """Drop a pool that proved bad and refill every weight block from a new one built from the source."""
        log.warning("%s; rebuilding the pool from %s", exc, self.config.model)
        self._drop_pool(unlink=True)
        return self._restore([b for b in self.arena.blocks if b.weights])

    def _staging_for(self, pool: WeightPool | None) -> StagingRing | None:
        """Pinned staging buffers while the mirror (None: ordinary host memory) is not pinned (yet) in this
        process; None once it is."""
        if self.device.type != "cuda" or (pool is not None and pool.pinned):
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            return None
        self._staging = self._staging or StagingRing(self.device)
        return self._staging

    @property
    def staging(self) -> StagingRing | None:
        return self._staging

    def _drop_pool(self, unlink: bool) -> None:
        if self.pool is not None:
            if unlink:
                self.pool.unlink()
            self.pool.close()
            self.pool, self._expected, self._pool_verified = None, None, False

    # -- sleep and wake -----------------------------------------------------------------------------------------
    def sleep(self, level: int) -> SleepResult:
        """Level 1: release the arena (weights and KV cache) and torch's cached blocks; the mirror stays. Level 2:
        also drop the mirror (wake reloads from the model source). The caller makes sure nothing runs."""
        self.check_open()
        phases = Phases(self.device)
        faults.transition_delay()
        freed = 0
        if self.state is WeightState.AWAKE:
            self.settle()  # a wake still landing: finish it (a corrupt pool is dropped, not slept on)
            self.skeleton.unbind()
            phases.mark("settle")
            freed = self.arena.release(weights=False)
            phases.mark("release_kv_cache", wait=False)
            freed += self.arena.release(weights=True)
            phases.mark("release_weights", wait=False)
            if self.device.type == "cuda":
                if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
                    torch._C._cuda_clearCublasWorkspaces()  # before empty_cache, which then returns them
                torch.cuda.empty_cache()
                phases.mark("empty_cache", wait=False)
        if level == 2:
            self._drop_pool(unlink=True)
            phases.mark("drop_pool", wait=False)
        self.state, self.sleep_level = WeightState.ASLEEP, max(level, self.sleep_level)
        return SleepResult(level, phases.total, freed, phases.seconds)

    def wake(self, overlap: bool = False) -> WakeResult:
        """One bulk copy from the pinned mirror (after level 1) or a reload from the source (after level 2).
        Raises DeviceMemoryError, and stays asleep, when the device has no room. With `overlap` (from the mirror),
        return once the copy is queued: the next forward runs behind it layer by layer (see settle)."""
        self.check_open()
        if self.state is WeightState.AWAKE:
            return WakeResult(0.0, 0, "none", False)
        self.phases = Phases(self.device)
        faults.transition_delay()
        level = self.sleep_level
        # from a pinned mirror the copy is queued at once, so each segment can be mapped just before its copy
        blocks = self.arena.allocate(defer=overlap and self.pool is not None and self.pool.pinned)
        self.phases.mark("allocate")
        try:
            origin = self._restore(blocks, overlap)
            self.arena.allocate()  # what the deferred allocation left to map (the KV cache), while the copy runs
        except BaseException:
            self.arena.release()
            raise
        self.state, self.sleep_level = WeightState.AWAKE, 0
        return WakeResult(self.phases.total, sum(b.nbytes for b in blocks if b.weights), origin,
                          self._last_restore_verified, self.phases.seconds, level, self._fill is not None)

    def swap(self, pool: WeightPool, source) -> None:
        """Serve `pool` (published, made for this layout and format: update.py) from now on, from `source`;
        only while asleep. The old pool is closed and removed unless another worker still has it open."""
        if self.state is WeightState.AWAKE:
            raise RuntimeError("weights are swapped only while asleep")
        old, old_name = self.pool, self.pool_name
        self.pool, self.source, self.pool_name = pool, source, pool.manifest.name
        self._expected, self._pool_verified = None, False  # the first wake from it verifies it
        self.sleep_level = 1
        if old is not None:
            old.close()
        remove_pool_files(self.config.shm_dir, old_name)

    def wait_pinned(self) -> None:
        """Block until the mirror is page-locked (pinned in the background after a worker's first copy), so that
        the next wake copies at full DMA speed. No-op on CPU."""
        if self.pool is not None and self.device.type == "cuda":
            self.pool.pin(self.device)  # no-op once started
            self.pool.wait_pinned()

    # -- accounting and shutdown ----------------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        return measure(self.device, arena_bytes=self.layout.total_bytes, weight_bytes=self.layout.weight_bytes,
                       resident_bytes=self.arena.present_bytes, arena_in_torch_allocator=not self.arena.stable_addresses,
                       mirror_bytes=self.pool.nbytes if self.pool else 0, scratch_bytes=self.arena.scratch_bytes)

    def close(self, remove_pool: bool = False) -> None:
        """Free the device and unmap the pool; `remove_pool` also deletes its files."""
        if self.state is WeightState.CLOSED:
            return
        self._gate.disarm()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy in flight may still write into what is freed below
        self._fill = None
        self.skeleton.unbind()
        self.arena.close()
        if self._staging is not None:
            self._staging.close()
        self._drop_pool(unlink=remove_pool)
        self.state = WeightState.CLOSED

    def check_open(self) -> None:
        if self.state is WeightState.CLOSED:
            raise ClosedError("the engine is closed")
