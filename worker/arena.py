"""The device arena: every weight of the model in one device address range.

The arena is cut into blocks: runs of layout segments that are either released on sleep or stay resident
(the last `keep_layers` layers). With CUDA VMM the blocks are physical allocations mapped into one reserved
range, so addresses never change. Otherwise (CPU, ROCm, no cuda-python) each block is a plain torch
allocation, re-made on wake, and the model's views must be re-bound.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

from . import faults
from .errors import DeviceMemoryError
from .fill import ArenaFill, Chunk, plan_chunks
from .layout import SEGMENT_ALIGN, ArenaLayout
from .pool import PIN_CHUNK, block_sums
from .staging import StagingRing
from .vmm import VirtualRange, vmm_unavailable_reason

log = logging.getLogger(__name__)

COPY_CHUNK = PIN_CHUNK  # 1 GiB: copy and checksum overlap chunk by chunk; only the last check shows
# (measured on an H200: 1 GiB chunks verify at no cost, 256 MiB chunks cost ~7 ms in stream switches)
# With VMM the scratch block (the KV cache) is mapped in pieces of this size as requests need them: mapping or
# unmapping costs ~0.65 ms per GiB on an H200, so a 16 GiB cache mapped whole at each wake made the copy 9 ms
# slower and each sleep 10 ms longer (benchmarks/wake_breakdown.py)
SCRATCH_PIECE = 256 << 20


@dataclass(frozen=True, slots=True)
class Block:
    start: int
    end: int
    resident: bool  # stays on the device while asleep
    weights: bool = True  # False for the scratch block (the KV cache): released on sleep, never copied

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def plan_blocks(layout: ArenaLayout, keep_layers: int, per_segment: bool = False) -> list[Block]:
    """Runs of adjacent segments that share their residency (one allocation each); with `per_segment`, one
    block per segment, so that a wake can map each one just before its copy is queued."""
    kept = {(s.start, s.end) for s in layout.resident_segments(keep_layers)}
    blocks: list[Block] = []
    for seg in sorted(layout.segments, key=lambda s: s.start):
        resident = (seg.start, seg.end) in kept
        if not per_segment and blocks and blocks[-1].resident == resident and blocks[-1].end == seg.start:
            blocks[-1] = Block(blocks[-1].start, seg.end, resident)
        else:
            blocks.append(Block(seg.start, seg.end, resident))
    return blocks


class DeviceArena:
    """`scratch_bytes` adds scratch after the weights for the batch KV cache (kvcache.py): it lives in the same
    address range (so a CUDA graph that captured it stays valid), is released on sleep and is never copied or
    verified. With VMM it is cut into SCRATCH_PIECE pieces: a wake maps those holding the first `scratch_head`
    bytes, `map_scratch` the others when they are first needed; without VMM it is one block, there whenever the
    weights are."""

    def __init__(self, layout: ArenaLayout, device: torch.device, keep_layers: int = 0, vmm: str = "auto",
                 scratch_bytes: int = 0, scratch_head: int = 0):
        self.layout = layout
        self.device = device
        self._vrange: VirtualRange | None = None
        self._tensors: dict[int, torch.Tensor] = {}  # block start -> uint8 tensor, for present blocks
        scratch = -(-scratch_bytes // SEGMENT_ALIGN) * SEGMENT_ALIGN
        reason = vmm_unavailable_reason(device) if vmm != "off" else "vmm is off"
        if reason is None:
            vrange = VirtualRange(device, layout.total_bytes + scratch)
            if all(s.start % vrange.granularity == 0 for s in layout.segments):
                self._vrange = vrange
            else:
                reason = f"VMM granularity {vrange.granularity} does not divide the layout's segments"
                vrange.close()
        if reason is not None:
            if vmm == "on":
                raise RuntimeError(f"vmm=on, but CUDA VMM cannot be used: {reason}")
            log.info("arena re-allocates on wake (%s)", reason)
        # VMM maps a block in ~0.1 ms, so it can map segment by segment ahead of the copy; torch allocations
        # are fewer and larger
        self.blocks = plan_blocks(layout, keep_layers, per_segment=self._vrange is not None)
        base = layout.total_bytes
        piece = scratch if self._vrange is None else -(-SCRATCH_PIECE // self._vrange.granularity) * self._vrange.granularity
        for lo in range(0, scratch, piece or 1):
            self.blocks.append(Block(base + lo, base + min(scratch, lo + piece), False, weights=False))
        self._starts = [b.start for b in self.blocks]
        self._scratch = (base, base + scratch)
        # pieces that start past this are mapped on demand (the first piece always belongs to the head)
        self._head_end = base + max(1, min(scratch_head, scratch))
        self._scratch_tensor: torch.Tensor | None = None

    @property
    def stable_addresses(self) -> bool:
        return self._vrange is not None

    @property
    def present_bytes(self) -> int:
        """Weight bytes on the device now."""
        return sum(b.nbytes for b in self.blocks if b.weights and b.start in self._tensors)

    @property
    def scratch_bytes_planned(self) -> int:
        """Size of the scratch, present or not (0 without any)."""
        return self._scratch[1] - self._scratch[0]

    @property
    def scratch_bytes(self) -> int:
        """Scratch (KV cache) bytes on the device now."""
        return sum(b.nbytes for b in self.blocks if not b.weights and b.start in self._tensors)

    def released_blocks(self) -> list[Block]:
        return [b for b in self.blocks if not b.resident]

    def missing_blocks(self) -> list[Block]:
        """Blocks without memory that an awake arena must have (scratch pieces past the head are on demand)."""
        return [b for b in self.blocks if b.start not in self._tensors and (b.weights or b.start < self._head_end)]

    def allocate(self, defer: bool = False) -> list[Block]:
        """Give memory to every block that has none; returns those blocks (their contents are undefined).
        With `defer` (and VMM), nothing is mapped now: weight blocks are mapped when a fill first queues a copy
        into them, so the mapping overlaps the copy, and the rest by a later `allocate()`; a fill that fails to
        map raises from `fill` (call `release` then)."""
        missing = self.missing_blocks()
        try:
            for block in missing:
                if defer and self._vrange is not None:
                    continue
                self._tensors[block.start] = self._new_block(block)  # the KV cache too: never read before written
        except BaseException:
            for block in missing:  # leave the arena as it was: nothing half-allocated
                self._drop_block(block)
            raise
        return missing

    def _new_block(self, block: Block) -> torch.Tensor:
        faults.check_allocation(block.nbytes)
        if self._vrange is not None:
            self._vrange.map(block.start, block.nbytes)
            return self._vrange.tensor[block.start : block.end]
        try:
            return torch.empty(block.nbytes, dtype=torch.uint8, device=self.device)
        except torch.OutOfMemoryError as exc:
            raise DeviceMemoryError(f"no room on {self.device} for {block.nbytes:,} bytes of weights: {exc}") from exc

    def map_scratch(self, lo: int, hi: int) -> None:
        """Give memory to the scratch pieces holding scratch bytes [lo, hi) that have none (the head must be
        there). Raises DeviceMemoryError when the device has no room; the pieces mapped before stay."""
        start, end = self._scratch[0] + lo, self._scratch[0] + hi
        for block in self.blocks[bisect.bisect_right(self._starts, start) - 1:]:
            if block.start >= end:
                break
            if not block.weights and block.start not in self._tensors:
                self._tensors[block.start] = self._new_block(block)

    def _drop_block(self, block: Block) -> None:
        if self._tensors.pop(block.start, None) is not None and self._vrange is not None:
            self._vrange.unmap(block.start)

    def release(self, weights: bool | None = None) -> int:
        """Free every non-resident block (`weights` True: the weight blocks only, False: the scratch block only);
        returns the bytes given back."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no kernel may still read what we unmap
        freed = 0
        for block in self.released_blocks():
            if block.start in self._tensors and weights in (None, block.weights):
                self._drop_block(block)
                freed += block.nbytes
        return freed

    def fill(self, host: torch.Tensor, blocks: list[Block], expected: torch.Tensor | None = None,
             staging: StagingRing | None = None, coded: dict | None = None) -> ArenaFill:
        """Start restoring `blocks` from the host mirror, group by group in execution order (see fill.py); with
        `expected` (all block sums, on this device) each chunk is also verified as it lands. `staging` carries
        the copy through pinned buffers when the mirror is not pinned (yet). `coded`: a compressed pool's chunk
        entries by arena start (its chunks are compressed.CHUNK_BYTES)."""
        if coded is not None:
            from .compressed import CHUNK_BYTES as size
        else:
            size = staging.nbytes if staging is not None else COPY_CHUNK
        chunks = plan_chunks(self.layout, [(b.start, b.end) for b in blocks], size)
        return ArenaFill(self.device, chunks, host, self._slice, expected, staging, coded).start()

    def chunk_bytes(self, chunk: Chunk) -> torch.Tensor:
        """The arena's bytes of `chunk` (present), where the arena lives."""
        return self._slice(chunk)

    def _slice(self, chunk: Chunk) -> torch.Tensor:
        block = self.blocks[bisect.bisect_right(self._starts, chunk.start) - 1]
        if block.start not in self._tensors:  # deferred by allocate(defer=True)
            self._tensors[block.start] = self._new_block(block)
        return self._tensors[block.start][chunk.start - block.start : chunk.end - block.start]

    def checksums(self) -> torch.Tensor:
        """Block sums of the weights (every block must be present), computed where the arena lives."""
        return torch.cat([block_sums(self._tensors[b.start]) for b in self.blocks if b.weights])

    def scratch(self) -> torch.Tensor | None:
        """The scratch bytes (one tensor over all of them, pieces on demand included) while its head is present,
        else None."""
        start, end = self._scratch
        if start == end or start not in self._tensors:
            return None
        if self._vrange is None:
            return self._tensors[start]
        if self._scratch_tensor is None:  # its own storage, not a view of the weights' tensor
            self._scratch_tensor = self._vrange.own_tensor(start, end - start)
        return self._scratch_tensor

    def views(self) -> dict[str, torch.Tensor]:
        """A typed view per layout slot, into whichever block holds it."""
        out = {}
        for slot in self.layout.slots:
            block = self.blocks[bisect.bisect_right(self._starts, slot.offset) - 1]
            base = self._tensors[block.start]
            lo = slot.offset - block.start
            out[slot.name] = base[lo : lo + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape)
        return out

    @property
    def address(self) -> int | None:
        """The arena's base device address when it is stable, else None."""
        return self._vrange.address if self._vrange is not None else None

    def close(self) -> None:
        for block in list(self.blocks):
            self._drop_block(block)
        self._scratch_tensor = None
        if self._vrange is not None:
            self._vrange.close()
            self._vrange = None
