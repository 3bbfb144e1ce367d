"""The scheduler: which sequences run, and what each step feeds them.

Every step it admits waiting sequences in arrival order while a batch slot and a cache extent are free (a
sequence that cannot have one waits, and so do those behind it: no request is overtaken), then builds one packed
forward: a token for every decoding sequence, and prompt tokens of the sequences still prefilling. While any
sequence decodes, a step feeds at most `prefill_chunk` tokens in all, so that a long prompt delays the running
decodes by one chunk per step, never by its whole length; with nothing decoding, a step takes up to
IDLE_STEP_TOKENS of prompt (nobody is waiting on it).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .errors import DeviceMemoryError, QueueFullError, ValidationError
from .kvcache import KVCache
from .runner import Batch
from .sequence import FINISH_ABORT, FINISH_ERROR, Sequence

IDLE_STEP_TOKENS = 8192
PREFILL_FLOOR = 32  # prompt tokens a step always takes beside any number of decodes


@dataclass(slots=True)
class Step:
    rows: list[Sequence]  # the decoding sequences first, then those feeding prompt tokens
    q_lens: list[int]
    batch: Batch
    sampled: list[int]  # indexes of the rows whose last token's logits give a new token this step


@dataclass(slots=True)
class SchedulerStats:
    running: int
    waiting: int
    kv_tokens: int  # positions in the cache
    kv_used_tokens: int  # positions held by running sequences' extents
    steps: int
    tokens: int  # tokens sampled so far
    queue_limit: int
    batch_limit: int
    queued_ahead: int  # decode steps queued before the step before them was accounted

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class Scheduler:
    cache: KVCache
    max_batch: int
    max_queue: int
    prefill_chunk: int
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    queued_ahead: int = 0  # decode steps planned before the tokens of the step before them were on the host
    refused: list = field(default_factory=list)  # (sequence, error) taken off the queue: no memory for its extent

    def check(self, seq: Sequence) -> None:
        """Refuse at once what can never run (ValueError) or cannot queue now (QueueFullError)."""
        need, limit = seq.reserve_tokens, self.cache.usable_tokens
        if need > limit:
            raise ValidationError(f"the request needs {need} KV cache positions (prompt {len(seq.prompt)} + max_tokens "
                             f"{seq.params.max_tokens} + 1) but the cache holds at most {limit} for one request")
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting for the batch (limit "
                                 f"{self.max_queue}); try again shortly")

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """End `seq` now (no step is in flight when this is called); False when it had already ended."""
        if seq.finish is not None:
            return False
        seq.finish = FINISH_ABORT
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.retire(seq)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.cache.tokens, self.cache.extents.used,
                              self.steps, self.tokens, self.max_queue, self.max_batch, self.queued_ahead)

    # -- one step ---------------------------------------------------------------------------------------------
    def plan(self) -> Step | None:
        self._admit()
        if not self.running:
            return None
        decodes = [s for s in self.running if not s.prefilling]
        budget = max(self.prefill_chunk - len(decodes), PREFILL_FLOOR) if decodes else IDLE_STEP_TOKENS
        rows: list[Sequence] = []
        feeds: list[list[int]] = []
        for seq in decodes:
            rows.append(seq)
            feeds.append(seq.next_input(1))
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                feed = seq.next_input(budget)
                rows.append(seq)
                feeds.append(feed)
                budget -= len(feed)
        tokens, positions, slots, q_lens, starts, lens, sampled = [], [], [], [], [], [], []
        for i, (seq, feed) in enumerate(zip(rows, feeds)):
            first = seq.cached
            n = len(feed)
            tokens += feed
            positions += range(first, first + n)
            slots += range(seq.extent + first, seq.extent + first + n)
            q_lens.append(n)
            starts.append(seq.extent)
            lens.append(first + n)
            if first + n >= len(seq.prompt):  # caught up: this row's last logits give the next token
                sampled.append(i)
        return Step(rows, q_lens, Batch(tokens, positions, slots, q_lens, starts, lens), sampled)

    def follow(self, step: Step) -> Step | None:
        """The decode step after `step`, planned before `step`'s tokens reach the host (they feed it from the
        device): the same sequences, one position further. None unless `step` is all decodes and each of its
        sequences has room for one more token; a sequence that turns out to have ended with `step` (EOS, a stop
        string) is dropped when this step is accounted."""
        batch = step.batch
        if len(batch.tokens) != len(step.rows) or len(step.sampled) != len(step.rows):
            return None
        if any(seq.finish is not None or len(seq.output) + 2 > seq.params.max_tokens
               or seq.params.repetition_penalty != 1.0 or len(seq.output) + 1 < seq.params.min_tokens
               for seq in step.rows):
            return None  # (a draw that depends on the tokens so far waits for them on the host)
        follow = Batch(batch.tokens, [p + 1 for p in batch.positions], [s + 1 for s in batch.slots], batch.q_lens,
                       batch.kv_starts, [n + 1 for n in batch.kv_lens])
        self.queued_ahead += 1
        return Step(step.rows, step.q_lens, follow, step.sampled)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            try:
                start = self.cache.reserve(seq.reserve_tokens)
            except DeviceMemoryError as exc:  # another process holds the device memory its extent needs
                self.waiting.popleft()
                seq.finish = FINISH_ERROR
                self.refused.append((seq, exc))
                continue
            if start is None:
                return  # the cache is full: it waits (and so does everyone behind it) for an extent to be freed
            self.waiting.popleft()
            seq.extent = start
            self.running.append(seq)

    def complete(self, step: Step, tokens: list[int | BaseException]) -> list[tuple[Sequence, int | BaseException]]:
        """Account the step: `tokens[j]` is the outcome of row `step.sampled[j]` (an id, or the error that row's
        sampling raised). Returns (sequence, outcome) for the rows of sequences still live; those that end here (EOS,
        max_tokens, an error) leave the batch now, and so do sequences that ended while the step ran (a stop string,
        a cancel): their outcome is dropped."""
        self.steps += 1
        live: list[tuple[Sequence, int | BaseException]] = []
        outcome = dict(zip(step.sampled, tokens))
        for i, (seq, n) in enumerate(zip(step.rows, step.q_lens)):
            if seq.finish is not None:
                self.retire(seq)
                continue
            seq.cached += n
            if i not in outcome:
                continue
            token = outcome[i]
            live.append((seq, token))
            if isinstance(token, BaseException):
                seq.finish = FINISH_ERROR
            else:
                self.tokens += 1
                seq.output.append(token)
                seq.finish = seq.writer.ends(token, len(seq.output))
            if seq.finish is not None:
                self.retire(seq)
        return live

    def retire(self, seq: Sequence) -> None:
        """Take a finished sequence out of the batch and free its extent (safe while a step that wrote into it is
        still in flight: the next admission's writes queue behind that step on the same stream)."""
        if seq.extent is not None:
            self.cache.extents.release(seq.extent)
            seq.extent = None
        if seq in self.running:
            self.running.remove(seq)

    def drain(self) -> list[Sequence]:
        """End every sequence (the engine is sleeping with abort, or stopping); returns them for their streams."""
        ended = [*self.running, *self.waiting]
        for seq in ended:
            seq.finish = FINISH_ABORT
            self.retire(seq)
        self.waiting.clear()
        return ended
