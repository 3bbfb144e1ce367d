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
import time
from collections.abc import Sequence as Seq

import torch

from . import faults
from .arena import DeviceArena
from .commands import CommandThread
from .config import WorkerConfig
from .errors import AsleepError, ClosedError
from .generation import FINISH_STOP, Completion, SamplingParams, TokenWriter
from .loading import load_parts
from .memory import MemoryReport
from .prepared import PreparedModel
from .sampler import Draw
from .scheduler import Scheduler, SchedulerStats, Step
from .sequence import FINISH_ERROR, Outbox, RequestStream, Sequence
from .transitions import Transitions
from .update import WeightsVersion
from .weights import WeightState, WeightStore

log = logging.getLogger(__name__)

EngineState = WeightState


class Engine(Transitions):
    def __init__(self, config: WorkerConfig):
        self.config = config
        self._outbox = Outbox()
        self._pending: list[tuple] = []  # a step's outcomes not yet sent: (sequence, token or error, logprobs or None)
        self._inflight: tuple[Step, Draw] | None = None  # a step queued on the device, not yet accounted
        self._pipeline = True  # queue each decode step before the one before it is accounted
        self._gather: tuple[int, float, float] | None = None  # (requests expected, hold at least until, at most)
        self.weights: WeightStore | None = None  # set by _load, on the engine thread
        self.scheduler: Scheduler | None = None
        self.runner = None  # ModelRunner, set by _load
        self.weights_version = WeightsVersion(config.weights_version, config.model)
        self._thread = CommandThread("ksleep-engine", self._loop)
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
            engine._thread.stop()
            raise
        return engine

    def _load(self, prepared: PreparedModel | None, awake: bool) -> None:
        parts = load_parts(self.config, prepared, awake)
        for name in parts.__slots__:
            setattr(self, name, getattr(parts, name))

    # -- the engine thread: commands between steps ---------------------------------------------------------
    def _call(self, fn, *args):
        return self._thread.call(fn, *args)

    def _post(self, fn, *args) -> None:
        self._thread.post(fn, *args)

    def _loop(self) -> None:
        try:
            while not self._thread.stopped:
                try:
                    self._iterate()
                except Exception as exc:  # noqa: BLE001 - the batch's requests fail; the engine keeps serving
                    log.exception("a step failed")
                    self._inflight, self._pending = None, []
                    self._fail(list(self.scheduler.running), exc)
                self._outbox.flush()
        finally:  # whatever ends the thread, no reader is left waiting
            if self.scheduler is not None:
                self._fail(self.scheduler.drain(), ClosedError("the engine stopped"))
                self._outbox.flush()

    def _iterate(self) -> None:
        hold = self._hold()
        busy = self._awake() and self.scheduler.has_work and hold is None
        if not busy:  # the last step's tokens go out before the thread waits for work
            self._drain()
        # the step in flight is accounted and its tokens sent before a command changes anything
        self._thread.run_pending(not busy, hold, before=self._drain)
        self._outbox.flush()
        if not self._thread.stopped and self._awake() and self._hold() is None:
            self._step()

    def _awake(self) -> bool:
        return self.weights is not None and self.weights.state is WeightState.AWAKE

    def _hold(self) -> float | None:
        """Seconds more a wake holds its first step for requests still on their way; None once it does not."""
        if self._gather is None:
            return None
        expected, shadow, until = self._gather
        left = (shadow if self.streams >= expected else until) - time.monotonic()
        if left <= 0:
            self._gather = None
            return None
        return left

    # -- one step -------------------------------------------------------------------------------------------
    def _step(self) -> None:
        """Account the step in flight (or plan and launch one), having first queued the step after it when that
        step can be planned without its tokens: the GPU then never waits for the host between decode steps."""
        if self._inflight is None:
            step = self.scheduler.plan()
            for seq, exc in self.scheduler.refused:
                self._outbox.add(seq.stream, [exc])
            self.scheduler.refused.clear()
            if step is None:
                return
            self._inflight = self._launch(step)
            if self._inflight is None:
                return
        step, drawn = self._inflight
        faults.step_delay()
        follow = self.scheduler.follow(step) if self._pipeline else None
        self._inflight = self._launch(follow, drawn.tokens) if follow is not None else None
        self._account(step, drawn)
        self._emit()
        self._outbox.flush()  # the tokens go out while the GPU runs the next step

    def _launch(self, step: Step, ids: torch.Tensor | None = None) -> tuple[Step, Draw] | None:
        """Queue `step`'s forward and draws (a forward behind a wake's copy is settled here: synchronously).

        Behind the copy the step runs eagerly, its layers waiting for their weights (hooks, which a graph would
        skip), over the padded inputs of the graph it would otherwise replay (runner.py): a request alone gets the
        same kernels for its prompt whether the model slept or not, hence the same tokens."""
        behind_copy = self.weights.filling
        try:
            logits = self.runner.forward(step.batch, eager=behind_copy, ids=ids)
            if behind_copy and self.weights.settle():  # it read a pool that proved corrupt, now rebuilt
                logits = self.runner.forward(step.batch)  # nothing accounted yet: run it again
        except BaseException as exc:
            if not self._awake():  # the rebuild failed: no weights to serve anyone with
                self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), exc)
                return None
            raise
        return step, self.sampler.launch(logits, step.sampled, [step.rows[i] for i in step.sampled],
                                         ahead=0 if ids is None else 1)  # (ids: the tokens of the step in flight)

    def _drain(self) -> None:
        """Account the step in flight, if any, and send what it produced (before anything changes state)."""
        if self._inflight is not None:
            (step, drawn), self._inflight = self._inflight, None
            self._account(step, drawn)
        self._emit()
        self._outbox.flush()

    def _account(self, step: Step, drawn: Draw) -> None:
        """The step's outcomes, each with the log-probabilities its request asked for."""
        tokens = self.sampler.collect(drawn)
        asked = {step.rows[step.sampled[j]]: info for j, info in self.sampler.logprobs(drawn).items()}
        self._pending = [(seq, token, asked.get(seq)) for seq, token in self.scheduler.complete(step, tokens)]

    def _emit(self) -> None:
        """Turn the last step's outcomes into events (text, stop strings) and hand them to their streams."""
        pending, self._pending = self._pending, []
        now = time.perf_counter()
        for seq, token, logprobs in pending:
            if not isinstance(token, BaseException):
                try:
                    event = seq.writer.push(token, now)
                    if logprobs is not None:
                        chosen, top = logprobs
                        event.logprob = (self.tokenizer.decode([token]), chosen)
                        event.top_logprobs = tuple((i, self.tokenizer.decode([i]), p)
                                                   for i, p in top[:seq.params.logprobs])
                except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer that cannot decode: this request fails
                    token = exc
            if isinstance(token, BaseException):
                seq.finish = FINISH_ERROR
                self.scheduler.retire(seq)  # (already out if its sampling failed)
                self._outbox.add(seq.stream, [token])
                continue
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
        stream.attach(lambda: self._post(self.scheduler.abort, seq), lambda: self._thread.alive)
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
        if self._thread.stopped:
            return
        try:
            try:
                self._call(self._close, remove_pool)
            except ClosedError:
                if self._thread.alive:
                    raise
                self._close(remove_pool)  # the engine thread is gone (it cannot race us): clean up from here
        finally:
            self._thread.stop()

    def _close(self, remove_pool: bool) -> None:
        if self.scheduler is not None:
            self._fail(self.scheduler.drain(), ClosedError("the engine was closed"))
        if self.weights is not None:
            self.kv_cache.unbind()
            self.weights.close(remove_pool)
        if self.runner is not None and self.runner.fusion is not None:
            self.runner.fusion.revert()  # the process's transformers module is shared with other engines

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_awake(self) -> None:
        self.weights.check_open()
        if self.weights.state is not WeightState.AWAKE:
            raise AsleepError(f"the model is asleep (level {self.weights.sleep_level}); wake it before generating")

