"""The engine: a model whose weights live in a device arena mirrored by a shared-memory pool.

    engine = Engine.load(WorkerConfig(model="smollm2-135m"))
    print(engine.complete("The future of artificial intelligence is", SamplingParams(max_tokens=50)).text)
    engine.sleep(1)     # device memory released, mirror kept: milliseconds
    engine.wake()       # one bulk host->device copy from the pinned mirror
"""
from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache

from . import faults
from .arena import Block, DeviceArena
from .decoder import DecodeCache, GraphDecoder, attention_backends, kv_bytes, static_cache_unsupported
from .fill import ArenaFill
from .gate import LayerGate
from .config import WorkerConfig
from .errors import AsleepError, BusyError, ClosedError, PoolCorruptError
from .generation import Completion, SamplingParams, TokenEvent, TokenStream, stream_tokens
from .layout import ArenaLayout
from .memory import MemoryReport, measure
from .pool import PoolManifest, WeightPool, pool_name
from .poolfiles import remove_pool_files
from .reports import LoadReport, Phases, SleepResult, WakeResult
from .skeleton import ModelSkeleton
from .staging import StagingRing
from .prepared import PreparedModel
from .prompt import PromptEncoder

log = logging.getLogger(__name__)


class EngineState(str, enum.Enum):
    AWAKE = "awake"
    ASLEEP = "asleep"
    CLOSED = "closed"


class Engine:
    def __init__(self, config: WorkerConfig, device: torch.device, source, skeleton: ModelSkeleton,
                 layout: ArenaLayout, tokenizer, arena: DeviceArena):
        self.config, self.device, self.source = config, device, source
        self.skeleton, self.layout, self.tokenizer, self.arena = skeleton, layout, tokenizer, arena
        self.pool_name = pool_name(config.pool_prefix, source, config.torch_dtype, layout)
        self.context_tokens = int(getattr(skeleton.config, "max_position_embeddings", 0) or 2**31)
        self.encode = PromptEncoder(tokenizer, int(skeleton.config.vocab_size), self.context_tokens, config.model).encode
        eos = [skeleton.config.eos_token_id, tokenizer.eos_token_id]
        self.eos_ids = frozenset(i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e]) if i is not None)
        self._pool: WeightPool | None = None
        self._expected: torch.Tensor | None = None  # the manifest's block sums, on the device
        self._lock = threading.RLock()  # re-entrant: a stream collected while this thread holds it releases its claim
        self._streams = 0
        self._last_restore_verified = False
        self._pool_verified = False  # the attached pool passed a checksum at least once
        self._staging: StagingRing | None = None
        self._fill: ArenaFill | None = None  # a restore still in flight behind the forward (overlapped wake)
        self._gate = LayerGate(skeleton.model, layout)
        self._decoder = (GraphDecoder(skeleton.model, skeleton.config, config.torch_dtype, device, config.graph_tokens,
                                      compile=config.decode_graphs == "compile" and device.type == "cuda") if arena.scratch_bytes_planned else None)
        self._phases = Phases(device)
        self._state = EngineState.ASLEEP
        self.sleep_level = 0
        self.load_report: LoadReport | None = None

    # -- loading --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: WorkerConfig, prepared: PreparedModel | None = None, awake: bool = True) -> Engine:
        """Load a model. `prepared` skips what a forkserver already built; `awake=False` attaches to an existing
        pool and leaves the device empty (the state of a worker restarted while the daemon sleeps); without a pool
        it builds none and stays asleep at level 2 (its first wake reads the source)."""
        phases = Phases(torch.device("cpu"))
        device = config.resolve_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.empty(1, device=device)  # create the CUDA context now, so that it is timed as such
            phases.device = device
        phases.mark("device_init")
        prepared = prepared or PreparedModel.build(config, device.type)
        scratch = 0
        if config.uses_static_cache(device):
            reason = static_cache_unsupported(prepared.skeleton.config, config.graph_tokens)
            if reason is None:
                scratch = kv_bytes(prepared.skeleton.config, config.torch_dtype, config.graph_tokens)
            elif config.decode_graphs == "auto":
                log.info("decoding eagerly: %s", reason)
            else:
                raise ValueError(f"decode_graphs={config.decode_graphs}: {reason}")
        arena = DeviceArena(prepared.layout, device, config.keep_layers, config.vmm, scratch)
        engine = cls(config, device, prepared.source, prepared.skeleton, prepared.layout, prepared.tokenizer, arena)
        engine._phases = phases
        phases.mark("prepare")
        try:
            how = engine._bring_up(awake)
            if device.type == "cuda" and engine.state is EngineState.AWAKE:
                engine._warm_up()  # queued behind the copy still in flight: kernels load while the weights land
            if engine._settle():  # the attached pool failed its checksum behind the warm-up
                how = "rebuilt"
            phases.mark("copy_verify_warm_up" if device.type == "cuda" else "copy_verify")
            if engine._decoder is not None and engine._decoder.compiled and engine.state is EngineState.AWAKE:
                with torch.inference_mode(), attention_backends(device):
                    engine._decoder.prepare(engine.arena.scratch())
                phases.mark("compile_decode")
        except BaseException:
            engine.close()
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()  # loading's scratch (synthetic draws, checksums) must not count as "awake"
        engine.load_report = LoadReport(phases.total, how, engine.pool_name, engine.layout.weight_bytes,
                                        engine.layout.total_bytes, arena.stable_addresses,
                                        engine._pool is not None and engine._pool.pinned,
                                        phases.seconds)
        log.info("loaded %s: %s", config.model, engine.load_report)
        return engine

    def _bring_up(self, awake: bool) -> str:
        """Attach to the pool or build it, then fill the arena and bind the model; returns how."""
        try:
            self._pool = WeightPool.open(self.config.shm_dir, self.pool_name)
        except PoolCorruptError as exc:
            log.warning("%s; rebuilding the pool", exc)
            remove_pool_files(self.config.shm_dir, self.pool_name)
        how = "attached" if self._pool is not None else "created"
        if not awake:
            if self._pool is None:  # nothing to attach to (a level-2 sleep dropped it): asleep as at level 2
                self._state, self.sleep_level = EngineState.ASLEEP, 2
                return "none"
            if self.device.type == "cuda":  # verified on the first wake
                self._pool.pin(self.device)
            self._state, self.sleep_level = EngineState.ASLEEP, 1
            return how
        blocks = self.arena.allocate()
        self._phases.mark("allocate")
        source = self._restore(blocks, overlap=awake)
        self._state, self.sleep_level = EngineState.AWAKE, 0
        if not awake:
            self.sleep(1)
        return "rebuilt" if how == "attached" and source == "source" else how

    def _build_pool(self) -> WeightPool:
        """A new, unpublished pool filled from the model source (checkpoint reads or synthetic draws)."""
        pool = WeightPool.create(self.config.shm_dir, self.pool_name, self.layout.total_bytes)
        self._phases.mark("create_pool")
        try:
            params = [s for s in self.layout.slots if s.kind == "param"]
            self.source.write_weights(params, pool.tensor, self.device, self.config.load_threads)
            by_name = {s.name: s for s in self.layout.slots}
            for name, value in self.skeleton.buffer_values().items():
                by_name[name].view(pool.tensor).copy_(value)
            self._phases.mark("read_source")
            if self.device.type == "cuda":  # after the fill: pinning pages already written is ~3x faster
                pool.pin(self.device)
                pool.wait_pinned()
                self._phases.mark("pin")
        except BaseException:
            pool.discard()
            raise
        return pool

    def _restore(self, blocks: list[Block], overlap: bool = False) -> str:
        """Copy `blocks` from the pool into the arena (building the pool first if there is none), verify, bind.
        With `overlap`, return once the copy is queued: the next forward runs behind it, layer by layer, and the
        verification is settled after that forward (see _settle). (On CPU the copy is done by then; only the
        verification waits for the forward.)"""
        if self._pool is None:
            self._pool = self._build_pool()
        pool = self._pool
        if pool.manifest is None:  # just built: checksum on the device, then publish
            self.arena.fill(pool.tensor, blocks).finish()
            self._phases.mark("copy")
            self._expected = self.arena.checksums()
            pool.publish(PoolManifest(self.pool_name, self.source.identity, str(self.config.torch_dtype),
                                      self.layout, self._expected.cpu().numpy(), time.time()))
            self.skeleton.bind(self.arena.views())
            self._phases.mark("checksum_publish_bind")
            self._last_restore_verified = self._pool_verified = True
            return "source"
        try:
            pool.check_intact()
            if self._expected is None:  # a pool's manifest is read once, when it is opened
                if pool.manifest.identity != self.source.identity or pool.manifest.layout != self.layout:
                    raise PoolCorruptError(f"{pool.path} was made for another model or layout")
                self._expected = torch.from_numpy(pool.manifest.block_sums).to(self.device)
        except PoolCorruptError as exc:
            return self._rebuild(exc)
        verify = self.config.verify_on_wake or not self._pool_verified  # always the first time
        fill = self.arena.fill(pool.tensor, blocks, self._expected if verify else None, self._staging_for(pool))
        self.skeleton.bind(self.arena.views())  # host-side work while the copy runs
        self._last_restore_verified = verify
        self._fill = fill
        if overlap:
            self._gate.arm(fill)
            self._phases.mark("queue_copy", wait=False)
            return "mirror"
        self._settle()
        self._phases.mark("copy_verify_bind")
        return "mirror" if self._pool is pool else "source"

    def _settle(self) -> bool:
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
                self._state, self.sleep_level = EngineState.ASLEEP, 2
                raise
            return True
        self._pool_verified = self._pool_verified or fill.verified
        if self.device.type == "cuda" and self._pool is not None:
            # no-op once started; begun only now so that it does not slow a staged copy that reads the same pages
            self._pool.pin(self.device)
        return False

    def _rebuild(self, exc: PoolCorruptError) -> str:
        """Drop a pool that proved bad and refill every weight block from a new one built from the source."""
        log.warning("%s; rebuilding the pool from %s", exc, self.config.model)
        self._drop_pool(unlink=True)
        return self._restore([b for b in self.arena.blocks if b.weights])

    def _warm_up(self) -> None:
        """One forward before serving: a fresh process loads its kernels and creates its cuBLAS handle on its
        first forward (~1 s for a 7B); better here than in the first user's time to first token."""
        with torch.inference_mode(), self._attention(self._decoder is not None):  # the first request's kernels
            self.skeleton.model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=self.device),
                                past_key_values=DynamicCache(config=self.skeleton.config), use_cache=True)

    def _attention(self, static_cache: bool):
        """The static-cache paths attend without cuDNN's SDPA kernel (see decoder.py); the others as transformers
        chooses."""
        return attention_backends(self.device) if static_cache else contextlib.nullcontext()

    def _staging_for(self, pool: WeightPool) -> StagingRing | None:
        """Pinned staging buffers while the mirror is not pinned (yet) in this process; None once it is."""
        if self.device.type != "cuda" or pool.pinned:
            if self._staging is not None:
                self._staging.close()
                self._staging = None
            return None
        self._staging = self._staging or StagingRing(self.device)
        return self._staging

    def _drop_pool(self, unlink: bool) -> None:
        if self._pool is not None:
            if unlink:
                self._pool.unlink()
            self._pool.close()
            self._pool, self._expected, self._pool_verified = None, None, False

    # -- sleep and wake -------------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def streams(self) -> int:
        """Generations streaming now."""
        return self._streams

    def sleep(self, level: int = 1) -> SleepResult:
        """Level 1: release the device arena and torch's cached blocks; the mirror stays. Level 2: also drop
        the mirror (wake reloads from the model source). Refused (BusyError) while generations are streaming."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        with self._lock:
            self._check_open()
            if self._streams:
                raise BusyError(f"{self._streams} generation(s) still streaming; sleep after they finish")
            t0 = time.perf_counter()
            faults.transition_delay()
            freed = 0
            if self._state is EngineState.AWAKE:
                self._settle()  # a wake still landing: finish it (a corrupt pool is dropped, not slept on)
                if self._decoder is not None and not self.arena.stable_addresses:
                    self._decoder.invalidate()  # its graphs and cache views hold the scratch that is freed now
                self.skeleton.unbind()
                freed = self.arena.release()
                if self.device.type == "cuda":
                    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
                        torch._C._cuda_clearCublasWorkspaces()  # before empty_cache, which then returns them
                    torch.cuda.empty_cache()
            if level == 2:
                self._drop_pool(unlink=True)
            self._state, self.sleep_level = EngineState.ASLEEP, max(level, self.sleep_level)
            return SleepResult(level, time.perf_counter() - t0, freed)

    def wake(self, overlap: bool = False) -> WakeResult:
        """One bulk copy from the pinned mirror (after level 1) or a reload from the source (after level 2).
        Raises DeviceMemoryError, and stays asleep, when the device has no room.

        `overlap` (from the mirror): return as soon as the copy is queued; the next forward runs behind it
        layer by layer, so a request's first token costs about the copy alone. `seconds` then covers only the
        allocation and queueing; the copy's verification is settled by that forward (or by the next sleep)."""
        with self._lock:
            self._check_open()
            if self._state is EngineState.AWAKE:
                return WakeResult(0.0, 0, "none", False)
            self._phases = Phases(self.device)
            faults.transition_delay()
            level = self.sleep_level
            # from a pinned mirror the copy is queued at once, so each segment can be mapped just before its copy
            blocks = self.arena.allocate(defer=overlap and self._pool is not None and self._pool.pinned)
            self._phases.mark("allocate")
            try:
                origin = self._restore(blocks, overlap)
                self.arena.allocate()  # what the deferred allocation left to map (the KV scratch), while the copy runs
            except BaseException:
                self.arena.release()
                raise
            self._state, self.sleep_level = EngineState.AWAKE, 0
            return WakeResult(self._phases.total, sum(b.nbytes for b in blocks), origin,
                              self._last_restore_verified, self._phases.seconds, level, self._fill is not None)

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                 started: float | None = None) -> TokenStream:
        """Stream tokens. Arguments and state are checked now; tokens come as the iterator is consumed. Close the
        stream (or consume it) to give its claim back; one never started is released by close() too."""
        started = time.perf_counter() if started is None else started
        params = params or SamplingParams()
        ids = self.encode(prompt, params.max_tokens)
        with self._lock:
            self._check_awake()
            self._streams += 1
            try:
                graphed = self._claim_static_cache(len(ids) + params.max_tokens)
            except BaseException:
                self._streams -= 1
                raise

        def release() -> None:  # TokenStream calls it once
            with self._lock:
                self._streams -= 1
                if graphed is not None and graphed.graphed:
                    self._decoder.release()

        return TokenStream(self._stream(ids, params, started, graphed), release)

    def _claim_static_cache(self, tokens: int) -> DecodeCache | None:
        """The static cache this request decodes over: the shared one and its graphs, a private one when another
        stream holds that, or None (transformers' DynamicCache) when there is no decoder or it is too long."""
        decoder = self._decoder
        if decoder is None or not decoder.accepts(tokens):
            return None
        if decoder.busy:  # a concurrent stream: the same length and kernels, eager steps
            return decoder.private(tokens)
        return decoder.acquire(self.arena.scratch(), tokens)

    def _stream(self, ids: list[int], params: SamplingParams, started: float,
                graphed: DecodeCache | None) -> Iterator[TokenEvent]:
        decoder = self._decoder
        cache = DynamicCache(config=self.skeleton.config) if graphed is None else None

        def run(input_ids: torch.Tensor, prefill: bool) -> torch.Tensor:
            if graphed is not None:
                return decoder.prefill(graphed, input_ids) if prefill else decoder.step(graphed, input_ids)
            out = self.skeleton.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1, :]

        def forward(input_ids: torch.Tensor, prefill: bool) -> torch.Tensor:
            nonlocal cache
            with self._lock, torch.inference_mode(), self._attention(graphed is not None):
                self._check_awake()
                logits = run(input_ids, prefill)
                if self._fill is not None and self._settle():  # ran behind a wake whose pool proved corrupt
                    if not prefill:
                        raise PoolCorruptError("the weights were rebuilt in the middle of a generation")
                    if graphed is None:
                        cache = DynamicCache(config=self.skeleton.config)
                    else:
                        decoder.reset(graphed)
                    logits = run(input_ids, prefill)
                return logits

        yield from stream_tokens(forward, self.tokenizer, ids, params, self.eos_ids, self.device, started)

    def complete(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Completion:
        started = time.perf_counter()
        return Completion.collect(self.generate(prompt, params, started), started)

    def wait_pinned(self) -> None:
        """Block until the mirror is page-locked (it is pinned in the background after a worker's first copy), so
        that the next wake copies at full DMA speed. No-op on CPU."""
        with self._lock:
            if self._pool is not None and self.device.type == "cuda":
                self._pool.pin(self.device)  # no-op once started
                self._pool.wait_pinned()

    # -- accounting and shutdown ----------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        return measure(self.device, arena_bytes=self.layout.total_bytes, weight_bytes=self.layout.weight_bytes,
                       resident_bytes=self.arena.present_bytes, arena_in_torch_allocator=not self.arena.stable_addresses,
                       mirror_bytes=self._pool.nbytes if self._pool else 0, scratch_bytes=self.arena.scratch_bytes)

    @property
    def model(self):
        return self.skeleton.model

    @property
    def decoder(self) -> GraphDecoder | None:
        """The graph decoder (None when decoding eagerly): its `captures` and `replays` count what it did."""
        return self._decoder

    def close(self, remove_pool: bool = False) -> None:
        """Free the device and unmap the pool; `remove_pool` also deletes its files."""
        with self._lock:
            if self._state is EngineState.CLOSED:
                return
            self._gate.disarm()
            self._fill = None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no copy in flight may still write into what is freed below
            self.skeleton.unbind()
            self.arena.close()
            if self._staging is not None:
                self._staging.close()
            self._drop_pool(unlink=remove_pool)
            self._state = EngineState.CLOSED

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._state is EngineState.CLOSED:
            raise ClosedError("the engine is closed")

    def _check_awake(self) -> None:
        self._check_open()
        if self._state is not EngineState.AWAKE:
            raise AsleepError(f"the model is asleep (level {self.sleep_level}); wake it before generating")
