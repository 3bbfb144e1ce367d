"""One restore of the arena in flight: chunks copied in execution order, an event per layer group.

The copy runs on a dedicated stream, group by group (embeddings, layer 0 ... N-1, head), and records a CUDA
event when each group has landed. A forward that starts before the copy ends waits on each group's event just
before that group runs (see gate.py), so the first token costs about the copy itself: layer k computes while
layer k+1 is still on the bus. Verification, when asked for, checksums each chunk on a side stream as it lands.

From a pinned mirror every copy is queued at once (asynchronous DMA). From an unpinned mirror (a fresh worker
attaching to the pool) the chunks go through the staging ring, which the CPU must feed, so `start` returns only
when the last chunk is on its way. (Feeding it from a thread while the warm-up forward loaded its kernels was
measured on an H200 host, 7B: 0.19 s + 1.34 s, no better than 0.75 s + 0.78 s one after the other; and 2.6-2.8 s
while the pool was also being pinned, which is why the engine pins only once a fill is done.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PoolCorruptError
from .layout import ArenaLayout
from .pool import BLOCK_BYTES, block_sums
from .staging import StagingRing


@dataclass(frozen=True, slots=True)
class Chunk:
    """arena[start:end] for `group`; never crosses a copy-chunk boundary (nor a pinned registration's)."""

    group: str
    start: int
    end: int


def plan_chunks(layout: ArenaLayout, spans: list[tuple[int, int]], size: int) -> list[Chunk]:
    """The parts of `spans` (arena byte ranges to restore) cut into chunks of at most `size` bytes, aligned to
    multiples of `size`, ordered by group execution order, so that the embeddings land first and the head last."""
    order = {g: i for i, g in enumerate(["embed", *(f"layer.{i}" for i in range(layout.num_layers)), "head"])}
    chunks = []
    for seg in sorted(layout.segments, key=lambda s: (order[s.group], s.start)):
        for lo, hi in spans:
            a, b = max(lo, seg.start), min(hi, seg.end)
            while a < b:
                cut = min(b, (a // size + 1) * size)
                chunks.append(Chunk(seg.group, a, cut))
                a = cut
    return chunks


class ArenaFill:
    """Copies `chunks` from `host` into the arena (dst(chunk) gives the device slice) and verifies them against
    `expected` block sums when given. Call `start()` once; then wait per group, or `finish()` for everything.

    With `coded` (a compressed pool's chunk entries by arena start), each coded chunk's record is copied into a
    small device ring instead and decoded from there into the arena on a stream of its own, while the next
    records cross the bus; the group events and the checksums then follow the decode (compressed.py)."""

    def __init__(self, device: torch.device, chunks: list[Chunk], host: torch.Tensor, dst,
                 expected: torch.Tensor | None = None, staging: StagingRing | None = None,
                 coded: dict | None = None):
        self.device = device
        self.chunks = chunks
        self._host, self._dst, self._expected, self._staging = host, dst, expected, staging
        self._coded = coded
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._verify_stream = torch.cuda.Stream(device) if self._cuda and expected is not None else None
        self._decode_stream = torch.cuda.Stream(device) if self._cuda and coded else None
        self._ring = None  # DeviceRing, made by start() when a coded chunk is restored on a GPU
        last = {c.group: i for i, c in enumerate(chunks)}
        self._group_end = {i: g for g, i in last.items()}  # chunk index -> group completed by it
        self.groups = list(last)
        self._events: dict[str, torch.cuda.Event] = {}
        self._flags: list[torch.Tensor] = []

    def start(self) -> ArenaFill:
        """Queue the copy (on CPU: do it). Returns once every chunk is queued."""
        if self._cuda:
            if self._decode_stream is not None and any(self._coded[c.start].coded for c in self.chunks):
                from .compressed import DeviceRing

                self._ring = DeviceRing(self.device)
            # after what the current stream queued: the ring's slots (and the arena's blocks) are its allocations
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                self._queue_all()
        else:
            self._queue_all()
        return self

    def _queue_all(self) -> None:
        for i, chunk in enumerate(self.chunks):
            dst = self._dst(chunk)
            entry = self._coded[chunk.start] if self._coded is not None else None
            ready = self._copy_stream  # the stream after which dst holds its bytes
            if entry is not None and entry.coded:
                ready = self._queue_decode(entry, dst)
            else:
                src = self._host[chunk.start : chunk.end] if entry is None else self._host[entry.offset : entry.offset + entry.nbytes]
                self._send(dst, src)
            if self._expected is not None:
                self._queue_check(chunk, dst, ready)
            group = self._group_end.get(i)
            if group is not None and self._cuda:
                event = torch.cuda.Event()
                if self._decode_stream is not None:  # the group's raw chunks (copy) and coded ones (decode)
                    self._decode_stream.wait_stream(self._copy_stream)
                    event.record(self._decode_stream)
                else:
                    event.record(self._copy_stream)
                self._events[group] = event

    def _send(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._staging is not None:
            self._staging.send(dst, src)
        else:
            dst.copy_(src, non_blocking=self._cuda)

    def _queue_decode(self, entry, dst: torch.Tensor):
        from .compressed import decode_chunk

        record = self._host[entry.offset : entry.offset + entry.nbytes]
        if self._ring is None:  # CPU: decode straight from the mapped pool
            decode_chunk(entry, record, dst)
            return None
        slot_index, slot = self._ring.take(entry.nbytes, self._copy_stream)
        self._send(slot, record)
        self._decode_stream.wait_stream(self._copy_stream)
        with torch.cuda.stream(self._decode_stream):
            decode_chunk(entry, slot, dst)
        self._ring.release(slot_index, self._decode_stream)
        return self._decode_stream

    def _queue_check(self, chunk: Chunk, dst: torch.Tensor, ready) -> None:
        want = self._expected[chunk.start // BLOCK_BYTES : chunk.end // BLOCK_BYTES]
        if self._verify_stream is None:
            self._flags.append((block_sums(dst) != want).any())
            return
        self._verify_stream.wait_stream(ready)  # after this chunk has landed, not the ones queued later
        with torch.cuda.stream(self._verify_stream):
            self._flags.append((block_sums(dst) != want).any())

    def wait_group(self, group: str) -> None:
        """Make the current stream wait until `group` has landed (the CPU does not wait)."""
        event = self._events.get(group)
        if event is not None:  # None: not part of this fill (resident layers), or on CPU
            torch.cuda.current_stream(self.device).wait_event(event)

    def finish(self) -> None:
        """Order the current stream after the whole copy and check the checksums; raises PoolCorruptError
        naming the first bad chunk's group."""
        if self._cuda:
            current = torch.cuda.current_stream(self.device)
            for stream in (self._copy_stream, self._decode_stream, self._verify_stream):
                if stream is not None:
                    current.wait_stream(stream)
            self._ring = None  # its slots go back to the allocator after everything that used them
        if self._flags:
            flags = torch.stack(self._flags)
            if bool(flags.any()):
                chunk = self.chunks[int(flags.nonzero()[0, 0])]
                raise PoolCorruptError(
                    f"weight pool checksum mismatch in bytes {chunk.start:,}-{chunk.end:,} ({chunk.group})")

    @property
    def verified(self) -> bool:
        return self._expected is not None
