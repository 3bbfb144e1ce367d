"""The compressed pool format: the arena cut into chunks, each one coded by codec.py or kept raw.

The pool file is the chunk records one after another (each 256-byte aligned, none straddling a PIN_CHUNK
registration); the manifest lists them (`ChunkEntry`), and its block sums are those of the *decoded* arena, so a
wake verifies exactly what it computes with. A coded record is
    table          int32[2**MAX_CODE_BITS]   codec.decode_table of the chunk's code (16 KiB)
    lane_bits      int32[lanes + 1]
    words          int32[n_words]
    sign_mantissa  uint8[values]
A chunk that would not shrink (buffers, float32 tensors, adversarial bits) is stored raw. Every 16-bit pattern
round-trips, so a chunk never needs to know which tensors it holds.

Chunks are the arena's CHUNK_BYTES-aligned pieces of each segment (fill.plan_chunks), the same whichever blocks
a wake restores (blocks are whole segments): keep_layers and partial restores pick a subset of them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import astuple, dataclass

import torch

from . import codec, codec_triton
from .errors import DeviceMemoryError
from .fill import plan_chunks
from .layout import ArenaLayout
from .pool import PIN_CHUNK, PoolManifest, WeightPool

log = logging.getLogger(__name__)

from .names import POOL_FORMATS

RAW, COMPRESSED = POOL_FORMATS[1:]
CHUNK_BYTES = 64 << 20  # arena bytes a chunk covers: a device ring of RING_SLOTS such chunks is 256 MiB
RING_SLOTS = 4
ALIGN = 256
TABLE_BYTES = 4 << codec.MAX_CODE_BITS


def _up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


@dataclass(frozen=True, slots=True)
class ChunkEntry:
    """arena[start:end] stored at pool[offset:offset + nbytes]; coded when lanes > 0, raw otherwise."""

    start: int
    end: int
    offset: int
    nbytes: int
    lanes: int = 0
    words: int = 0

    @property
    def coded(self) -> bool:
        return self.lanes > 0

    @property
    def values(self) -> int:
        return (self.end - self.start) // 2

    def sections(self) -> tuple[int, int, int, int]:
        """Offsets within the record of table, lane_bits, words, sign_mantissa."""
        lane_bits = TABLE_BYTES
        words = lane_bits + _up(4 * (self.lanes + 1))
        return 0, lane_bits, words, words + _up(4 * self.words)

    def views(self, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(table, lane_bits, words, sign_mantissa) as views of a record's uint8 bytes, wherever they are."""
        table, lane_bits, words, sm = self.sections()
        return (record[table:lane_bits].view(torch.int32), record[lane_bits:lane_bits + 4 * (self.lanes + 1)].view(torch.int32),
                record[words:words + 4 * self.words].view(torch.int32), record[sm:sm + self.values])

    def to_list(self) -> list[int]:
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: list) -> ChunkEntry:
        if len(values) != 6 or not all(isinstance(v, int) and v >= 0 for v in values):
            raise ValueError(f"bad chunk entry {values!r}")
        return cls(*values)


def resolve(pool_format: str, device: torch.device, dtype: torch.dtype) -> str:
    """The pool format to use: `auto` is compressed where the GPU decoder runs (bf16 weights), raw elsewhere."""
    if pool_format == COMPRESSED and device.type == "cuda":
        codec_triton.self_test(device)  # now, not in the first wake (False: decoded with plain torch, slowly)
    if pool_format != "auto":
        return pool_format
    return COMPRESSED if dtype == torch.bfloat16 and device.type == "cuda" and codec_triton.self_test(device) else RAW


def encode_chunk(data: torch.Tensor) -> tuple[int, int, torch.Tensor] | None:
    """(lanes, words, record on the host) for uint8 `data`, or None when coding it would not save bytes."""
    packed = codec.encode(data.view(torch.bfloat16))
    entry = ChunkEntry(0, data.numel(), 0, 0, packed.lanes, packed.words.numel())
    size = entry.sections()[3] + entry.values
    if size >= data.numel():
        return None
    record = torch.zeros(size, dtype=torch.uint8)
    table, lane_bits, words, sm = entry.views(record)
    table.copy_(codec.decode_table(packed.lengths))
    lane_bits.copy_(packed.lane_bits)
    words.copy_(packed.words)
    sm.copy_(packed.sign_mantissa)
    return packed.lanes, packed.words.numel(), record


def encode_arena(layout: ArenaLayout, arena_bytes) -> tuple[list[ChunkEntry], list[torch.Tensor]]:
    """Code every chunk of the arena (`arena_bytes(chunk)`: its uint8 bytes, on the arena's device, where the
    encoder runs); returns the entries and each chunk's host record, laid out for one pool file."""
    entries, records, offset = [], [], 0
    for chunk in plan_chunks(layout, [(0, layout.total_bytes)], CHUNK_BYTES):
        data = arena_bytes(chunk)
        coded = encode_chunk(data)
        record = data.cpu() if coded is None else coded[2]
        offset = _up(offset)
        if offset // PIN_CHUNK != (offset + record.numel() - 1) // PIN_CHUNK:
            offset = _up(offset, PIN_CHUNK)  # a copy must not straddle two pinned registrations
        lanes, words = (0, 0) if coded is None else coded[:2]
        entries.append(ChunkEntry(chunk.start, chunk.end, offset, record.numel(), lanes, words))
        records.append(record)
        offset += record.numel()
    return entries, records


def write_pool(shm_dir, name: str, identity: str, dtype: str, layout: ArenaLayout, block_sums, arena_bytes,
               device: torch.device, pin: bool) -> WeightPool:
    """Code the arena (`arena_bytes(chunk)` on `device`: see encode_arena) and publish it as the compressed pool
    `name`, whose manifest carries `block_sums` of the decoded bytes; `pin` page-locks it for DMA first."""
    entries, records = encode_arena(layout, arena_bytes)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the encoder's temporaries: room for the KV cache's pieces mapped later
    manifest = PoolManifest(name, identity, dtype, layout, block_sums, time.time(), COMPRESSED, entries)
    pool = WeightPool.create(shm_dir, name, manifest.file_bytes)
    try:
        for i, entry in enumerate(entries):
            pool.tensor[entry.offset : entry.offset + entry.nbytes].copy_(records[i])
            records[i] = None  # freed as it lands: the host holds the pool and what is left to write
        if pin and device.type == "cuda":
            pool.pin(device)
            pool.wait_pinned()
        pool.publish(manifest)
    except BaseException:
        pool.discard()
        raise
    log.info("compressed pool %s: %s bytes, %.3f of the arena's %s", name, f"{manifest.file_bytes:,}",
             manifest.file_bytes / layout.total_bytes, f"{layout.total_bytes:,}")
    return pool


def decode_chunk(entry: ChunkEntry, record: torch.Tensor, dst: torch.Tensor) -> None:
    """Expand a coded record into `dst` (uint8, the chunk's arena bytes), on dst's device: the Triton kernel on a
    GPU (queued on the current stream), the torch reference decoder on CPU."""
    table, lane_bits, words, sm = entry.views(record)
    if dst.device.type == "cuda" and codec_triton.self_test(dst.device):
        codec_triton.decode_into(dst.view(torch.int16), words, lane_bits, table, sm)
        return
    # CPU, or a GPU where the Triton kernel does not run (pool_format=compressed asked for anyway): plain torch
    chunk = codec.PackedChunk(entry.values, torch.empty(0), lane_bits, words, sm)
    dst.view(torch.bfloat16).copy_(codec.decode(chunk, table))


class DeviceRing:
    """RING_SLOTS device buffers that coded records are copied into before they are decoded: a slot is reused
    only once the decode that read it is done (an event, waited on by the copy stream: the host never waits)."""

    def __init__(self, device: torch.device, slot_bytes: int = CHUNK_BYTES, slots: int = RING_SLOTS):
        try:
            self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        except torch.OutOfMemoryError as exc:  # the wake fails and the model stays asleep, as for the arena
            raise DeviceMemoryError(f"no room on {device} for the wake's {slot_bytes * slots:,}-byte decode ring") from exc
        self._freed: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0
        self.nbytes = slot_bytes * slots

    def take(self, nbytes: int, copy_stream) -> tuple[int, torch.Tensor]:
        """The next slot (index, its first `nbytes`), `copy_stream` ordered after its last decode."""
        k, self._next = self._next, (self._next + 1) % len(self._slots)
        if self._freed[k] is not None:
            copy_stream.wait_event(self._freed[k])
        return k, self._slots[k][:nbytes]

    def release(self, k: int, decode_stream) -> None:
        event = torch.cuda.Event()
        event.record(decode_stream)
        self._freed[k] = event

    def close(self) -> None:
        self._slots, self._freed = [], []


def chunk_entries(entries: list[ChunkEntry]) -> dict[int, ChunkEntry]:
    return {e.start: e for e in entries}


def check_entries(entries: list[ChunkEntry], layout: ArenaLayout, file_bytes: int) -> None:
    """Raise ValueError unless the entries tile the arena's segments as fill.plan_chunks does and fit the file."""
    planned = [(c.start, c.end) for c in plan_chunks(layout, [(0, layout.total_bytes)], CHUNK_BYTES)]
    if sorted((e.start, e.end) for e in entries) != sorted(planned):
        raise ValueError("the chunk table does not cover the layout")
    for e in entries:
        if e.offset + e.nbytes > file_bytes:
            raise ValueError(f"chunk at {e.start:,} lies past the end of the file")
        if e.coded and (e.nbytes != e.sections()[3] + e.values or e.nbytes >= e.end - e.start or e.words < 3
                        or e.lanes != -(-e.values // codec.GROUP) * codec.LANES):
            raise ValueError(f"chunk at {e.start:,} has inconsistent sizes")
        if not e.coded and e.nbytes != e.end - e.start:
            raise ValueError(f"raw chunk at {e.start:,} has the wrong size")

