"""The engine: a model whose weights live in a device arena mirrored by a shared-memory pool, serving every
request it is given in one continuous batch.

    engine = Engine.load(WorkerConfig(model="smollm2-135m"))
    print(engine.complete("The future of artificial intelligence is", SamplingParams(max_tokens=50)).text)
    engine.sleep(1)     # device memory released, mirror kept: milliseconds
    engine.wake()       # one bulk host->device copy from the pinned mirror

All torch work runs on the engine's own thread, one step at a time: each step admits waiting requests, runs one
packed forward for every running sequence (runner.py), samples each row (sampler.py) and streams the tokens out.
Sleep, wake and the rest are commands that thread runs between steps. The calls below may come from any thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence as Seq
from concurrent.futures import Future, TimeoutError as FutureTimeout

import torch

from . import attention
from .arena import DeviceArena
from .config import WorkerConfig
from .errors import AsleepError, BusyError, ClosedError, SleepAbortError
from .generation import FINISH_STOP, Completion, SamplingParams, TokenWriter
from .kvcache import CacheSize, KVCache, bytes_per_token, head_dim, kv_heads
from .memory import MemoryReport
from .prepared import PreparedModel
from .prompt import PromptEncoder
from .reports import LoadReport, Phases, SleepResult, WakeResult
from .runner import Batch, ModelRunner
from .sampler import Draw, Sampler
from .scheduler import Scheduler, SchedulerStats, Step
from .sequence import Outbox, RequestStream, Sequence
from .weights import WeightState, WeightStore

log = logging.getLogger(__name__)

EngineState = WeightState
GATHER_SECONDS = 0.05  # the most a wake holds its first step for the requests the supervisor said are coming
# ... and at least this share of its copy's expected time (at 200 GB/s: ~10 % of a PCIe 5 copy), which costs nothing:
# the first layers' weights land only then, and requests that arrive meanwhile join the first step
SHADOW_BYTES_PER_SECOND = 200e9


class Engine:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = Outbox()
        self._pending: list[tuple[Sequence, int | BaseException]] = []  # a step's outcomes not yet sent
        self._inflight: tuple[Step, Draw] | None = None  # a step queued on the device, not yet accounted
        self._pipeline = True  # queue each decode step before the one before it is accounted
        self._gather: tuple[int, float, float] | None = None  # (requests expected, hold at least until, at most)
        self._stopped = False
        self.weights: WeightStore | None = None  # set by _load, on the engine thread
        self.scheduler: Scheduler | None = None
        self._thread = threading.Thread(target=self._loop, name="ksleep-engine", daemon=True)
        self._thread.start()

    # -- loading --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, config: WorkerConfig, prepared: PreparedModel | None = None, awake: bool = True) -> Engine:
        """Load a model. `prepared` skips what a forkserver already built; `awake=False` attaches to an existing
        pool and leaves the device empty (the state of a worker restarted while the daemon sleeps); without a pool
        it builds none and stays asleep at level 2 (its first wake reads the source)."""
        engine = cls(config)
        try:
            engine._call(engine._load, prepared, awake)
        except BaseException:
            engine._stop_thread()
            raise
        return engine

    def _load(self, prepared: PreparedModel | None, awake: bool) -> None:
        config = self.config
        phases = Phases(torch.device("cpu"))
        device = self.device = config.resolve_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.empty(1, device=device)  # create the CUDA context now, so that it is timed as such
            phases.device = device
        phases.mark("device_init")
        prepared = prepared or PreparedModel.build(config, device.type)
        self.skeleton, self.layout, self.tokenizer = prepared.skeleton, prepared.layout, prepared.tokenizer
        model_config = self.skeleton.config
        attention.register()
        model_config._attn_implementation = attention.ATTENTION_NAME
        self.context_tokens = int(getattr(model_config, "max_position_embeddings", 0) or 2**31)
        self.encode = PromptEncoder(self.tokenizer, int(model_config.vocab_size), self.context_tokens, config.model).encode
        eos = [model_config.eos_token_id, self.tokenizer.eos_token_id]
        self.eos_ids = frozenset(i for e in eos for i in (e if isinstance(e, (list, tuple)) else [e]) if i is not None)
        dtype = config.torch_dtype
        tokens = CacheSize.parse(config.kv_cache).tokens(bytes_per_token(model_config, dtype), device,
                                                         self.layout.total_bytes)
        self.kv_cache = KVCache.for_model(model_config, dtype, tokens)
        arena = DeviceArena(self.layout, device, config.keep_layers, config.vmm, self.kv_cache.nbytes)
        self.weights = WeightStore(config, device, prepared.source, self.skeleton, self.layout, arena, phases)
        self.attention = "gather"
        reason = attention.flash_unavailable_reason(device, dtype, int(model_config.num_attention_heads),
                                                    kv_heads(model_config), head_dim(model_config))
        if reason is None:
            self.attention = "flash"
        elif device.type == "cuda":
            log.warning("attention falls back to padded SDPA, steps run eagerly: %s", reason)
        if config.cuda_graphs == "on" and (device.type != "cuda" or reason is not None):
            raise ValueError(f"cuda_graphs=on, but CUDA graphs do not apply here: {reason}")
        self.runner = ModelRunner(self.skeleton.model, self.kv_cache, device, self.attention,
                                  config.cuda_graphs != "off", config.max_batch,
                                  max(config.prefill_chunk, config.max_batch + 32))
        self.scheduler = Scheduler(self.kv_cache, config.max_batch, config.max_queue, config.prefill_chunk)
        self.sampler = Sampler(device)
        phases.mark("prepare")
        try:
            how = self.weights.bring_up(awake)
            if self.weights.state is WeightState.AWAKE:
                self.kv_cache.bind(arena.scratch())
                if device.type == "cuda":  # queued behind the copy still in flight: kernels load while it lands
                    self._warm_up()
                if self.weights.settle():  # the attached pool failed its checksum behind the warm-up
                    how = "rebuilt"
            phases.mark("copy_verify_warm_up" if device.type == "cuda" else "copy_verify")
        except BaseException:
            self.weights.close()
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()  # loading's scratch (synthetic draws, checksums) must not count as "awake"
        pool = self.weights.pool
        self.load_report = LoadReport(phases.total, how, self.weights.pool_name, self.layout.weight_bytes,
                                      self.layout.total_bytes, arena.stable_addresses, pool is not None and pool.pinned,
                                      phases.seconds)
        log.info("loaded %s: %s; KV cache %d positions (%.2f GB), attention %s, graphs %s", config.model,
                 self.load_report, tokens, self.kv_cache.nbytes / 1e9, self.attention, self.runner.graphs_enabled)

    def _warm_up(self) -> None:
        """One forward before serving: a fresh process loads its kernels and creates its cuBLAS handle on its
        first forward (~1 s for a 7B); better here than in the first user's time to first token. It writes only
        the cache's pad positions."""
        self.runner.forward(Batch([0, 0], [0, 1], [0, 1], [2], [0], [2]), eager=True)

    # -- commands: run on the engine thread between steps ------------------------------------------------------
    def _call(self, fn, *args):
        """Run `fn(*args)` on the engine thread and return its result (or raise its error)."""
        if self._stopped:
            raise ClosedError("the engine is closed")
        future: Future = Future()
        self._commands.put((fn, args, future))
        while True:
            try:
                return future.result(timeout=1.0)
            except FutureTimeout:  # a bound on the wait: an engine thread that is gone never answers
                if not self._thread.is_alive():
                    raise ClosedError("the engine thread stopped") from None

    def _post(self, fn, *args) -> None:
        """Run `fn(*args)` on the engine thread, not waiting for it."""
        if not self._stopped:
            self._commands.put((fn, args, None))

    def _loop(self) -> None:
        while not self._stopped:
            busy = self._awake() and self.scheduler.has_work and not self._gathering()
            if not busy:  # the last step's tokens go out before the thread waits for work
                self._drain()
            self._run_commands(block=not busy)
            if self._stopped or not self._awake() or self._gathering():
                continue
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the step's requests fail; the engine keeps serving
                log.exception("a step failed")
                self._inflight = None
                self._fail(list(self.scheduler.running), exc)
                self._outbox.flush()

    def _run_commands(self, block: bool) -> None:
        timeout = None
        if block and self._gather is not None:
            expected, shadow, until = self._gather
            timeout = max(0.0, (shadow if self.streams >= expected else until) - time.monotonic())
        while True:
            try:
                fn, args, future = self._commands.get(block=block, timeout=timeout) if block else \
                    self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            self._drain()  # the step in flight is accounted and its tokens sent before anything changes state
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                if future is None:
                    log.exception("engine command %s failed", getattr(fn, "__name__", fn))
                else:
                    future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)
            self._outbox.flush()

    def _awake(self) -> bool:
        return self.weights is not None and self.weights.state is WeightState.AWAKE

    def _gathering(self) -> bool:
        """A wake is holding its first step for requests still on their way."""
        if self._gather is None:
            return False
        expected, shadow, until = self._gather
        now = time.monotonic()
        arrived = len(self.scheduler.waiting) + len(self.scheduler.running)
        if (arrived >= expected and now >= shadow) or now >= until:
            self._gather = None
            return False
        return True

    # -- one step -------------------------------------------------------------------------------------------
    def _step(self) -> None:
        """Account the step in flight (or plan and launch one), having first queued the step after it when that
        step can be planned without its tokens: the GPU then never waits for the host between decode steps."""
        if self._inflight is None:
            step = self.scheduler.plan()
            if step is None:
                return
            self._inflight = self._launch(step)
            if self._inflight is None:
                return
        step, drawn = self._inflight
        follow = self.scheduler.follow(step) if self._pipeline else None
        self._inflight = self._launch(follow, drawn.tokens) if follow is not None else None
        self._pending = self.scheduler.complete(step, self.sampler.collect(drawn))
        self._emit()
        self._outbox.flush()  # the tokens go out while the GPU runs the next step

    def _launch(self, step: Step, ids: torch.Tensor | None = None) -> tuple[Step, Draw] | None:
        """Queue `step`'s forward and draws (a forward behind a wake's copy is settled here: synchronously).

        A step without a decode row runs eagerly, awake or not: the first step after a wake always is one, and
        its layers must wait for their weights (hooks, which a graph would skip), so a request alone gets the same
        kernels for its prompt whether the model slept or not, hence the same tokens. Steps with decode rows replay
        graphs."""
        behind_copy = self.weights.filling
        try:
            logits = self.runner.forward(step.batch, eager=behind_copy or not step.decodes, ids=ids)
            if behind_copy and self.weights.settle():  # it read a pool that proved corrupt, now rebuilt
                logits = self.runner.forward(step.batch, eager=not step.decodes)  # nothing accounted yet: run it again
        except BaseException as exc:
            if not self._awake():  # the rebuild failed: no weights to serve anyone with
                self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), exc)
                return None
            raise
        return step, self.sampler.launch(logits, step.sampled, [step.rows[i] for i in step.sampled])

    def _drain(self) -> None:
        """Account the step in flight, if any, and send what it produced (before anything changes state)."""
        if self._inflight is not None:
            (step, drawn), self._inflight = self._inflight, None
            self._pending = self.scheduler.complete(step, self.sampler.collect(drawn))
        self._emit()
        self._outbox.flush()

    def _emit(self) -> None:
        """Turn the last step's outcomes into events (text, stop strings) and hand them to their streams."""
        pending, self._pending = self._pending, []
        now = time.perf_counter()
        for seq, token in pending:
            if isinstance(token, BaseException):
                self._outbox.add(seq.stream, [token])
                continue
            event = seq.writer.push(token, now)
            if event.finish_reason == FINISH_STOP and seq.finish is None:
                seq.finish = FINISH_STOP  # found only now: it leaves the batch after the step in flight
                self.scheduler.retire(seq)
            self._outbox.add(seq.stream, [event])

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> None:
        self._emit()
        for seq in seqs:
            self.scheduler.abort(seq)
            self._outbox.add(seq.stream, [exc])

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt: str | Seq[int] | Seq[dict], params: SamplingParams | None = None,
                 started: float | None = None, loop=None) -> RequestStream:
        """Stream tokens. The prompt, the parameters, the state and the queue's room are checked now (ValueError,
        AsleepError, QueueFullError); tokens come as the stream is read: by iteration, or with `async for` when
        `loop` is the asyncio loop that reads it. Closing the stream cancels the request at the next step."""
        started = time.perf_counter() if started is None else started
        params = params or SamplingParams()
        ids = self.encode(prompt, params.max_tokens)
        self._check_awake()
        stream = RequestStream(loop)
        stream.prompt_tokens = len(ids)
        seq = Sequence(ids, params, TokenWriter(self.tokenizer, params, self.eos_ids, started), stream, self.device)
        self.scheduler.check(seq)
        stream.attach(lambda: self._post(self.scheduler.abort, seq), self._thread.is_alive)
        self._post(self._admit, seq)
        return stream

    def _admit(self, seq: Sequence) -> None:
        try:
            if seq.stream.finished:  # closed before it was admitted
                return
            self._check_awake()
            self.scheduler.add(seq)
        except Exception as exc:  # noqa: BLE001 - asleep or full by now: the request hears why
            self._outbox.add(seq.stream, [exc])

    def complete(self, prompt: str | Seq[int] | Seq[dict], params: SamplingParams | None = None) -> Completion:
        started = time.perf_counter()
        return Completion.collect(self.generate(prompt, params, started), started)

    # -- sleep and wake -------------------------------------------------------------------------------------
    @property
    def state(self) -> WeightState:
        return self.weights.state

    @property
    def sleep_level(self) -> int:
        return self.weights.sleep_level

    @property
    def streams(self) -> int:
        """Requests running or waiting for the batch."""
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def sleep(self, level: int = 1, abort: bool = False) -> SleepResult:
        """Level 1: release the device arena (weights and KV cache) and torch's cached blocks; the mirror stays.
        Level 2: also drop the mirror (wake reloads from the model source). Refused (BusyError) while requests run
        or wait, unless `abort`, which ends them (their streams raise SleepAbortError)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
        return self._call(self._sleep, level, abort)

    def _sleep(self, level: int, abort: bool) -> SleepResult:
        self.weights.check_open()
        if self.scheduler.has_work:
            if not abort:
                raise BusyError(f"{self.streams} generation(s) still running or waiting; sleep after they finish")
            self._fail(self.scheduler.drain(), SleepAbortError("cancelled: the model was put to sleep"))
        self._gather = None
        if self.weights.state is WeightState.AWAKE:
            self.weights.settle()  # a wake still landing: finish it before the cache goes
            self.kv_cache.unbind()
            if not self.weights.arena.stable_addresses:
                self.runner.forget_graphs()  # they captured the arena's addresses, which are about to be freed
        return self.weights.sleep(level)

    def wake(self, overlap: bool = False, waiting: int = 0) -> WakeResult:
        """One bulk copy from the pinned mirror (after level 1) or a reload from the source (after level 2).
        Raises DeviceMemoryError, and stays asleep, when the device has no room.

        `overlap` (from the mirror): return as soon as the copy is queued; the next step runs behind it layer by
        layer, so a request's first token costs about the copy alone. `seconds` then covers only the allocation
        and queueing; the copy's verification is settled by that step (or by the next sleep). `waiting`: requests
        on their way; the first step waits for them (at most GATHER_SECONDS) so that they run together."""
        return self._call(self._wake, overlap, waiting)

    def _wake(self, overlap: bool, waiting: int) -> WakeResult:
        result = self.weights.wake(overlap)
        if result.source != "none":
            self.kv_cache.bind(self.weights.arena.scratch())
            if waiting and result.overlapped:
                now = time.monotonic()
                shadow = min(GATHER_SECONDS, result.bytes_restored / SHADOW_BYTES_PER_SECOND)
                self._gather = (waiting, now + shadow, now + GATHER_SECONDS)
        return result

    def wait_pinned(self) -> None:
        """Block until the mirror is page-locked, so that the next wake copies at full DMA speed (no-op on CPU)."""
        self._call(self.weights.wait_pinned)

    # -- accounting and shutdown ----------------------------------------------------------------------------
    def memory(self) -> MemoryReport:
        return self.weights.memory()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    @property
    def pool_name(self) -> str:
        return self.weights.pool_name

    @property
    def source(self):
        """Where the weights come from (a checkpoint directory, the embedded model, synthetic draws)."""
        return self.weights.source

    @property
    def arena(self) -> DeviceArena:
        return self.weights.arena

    @property
    def model(self):
        return self.skeleton.model

    def close(self, remove_pool: bool = False) -> None:
        """Free the device and unmap the pool; `remove_pool` also deletes its files. Requests still running end
        with ClosedError."""
        if self._stopped:
            return
        try:
            self._call(self._close, remove_pool)
        finally:
            self._stop_thread()

    def _close(self, remove_pool: bool) -> None:
        if self.scheduler is not None:
            self._fail(self.scheduler.drain(), ClosedError("the engine was closed"))
        if self.weights is not None:
            self.kv_cache.unbind()
            self.weights.close(remove_pool)

    def _stop_thread(self) -> None:
        self._stopped = True
        self._commands.put((lambda: None, (), None))  # wakes the loop if it waits for a command
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_awake(self) -> None:
        self.weights.check_open()
        if self.weights.state is not WeightState.AWAKE:
            raise AsleepError(f"the model is asleep (level {self.weights.sleep_level}); wake it before generating")

