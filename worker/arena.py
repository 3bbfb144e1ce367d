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
from .errors import DeviceMemoryError, PoolCorruptError
from .layout import ArenaLayout
from .pool import BLOCK_BYTES, PIN_CHUNK, block_sums
from .staging import StagingRing
from .vmm import VirtualRange, vmm_unavailable_reason

log = logging.getLogger(__name__)

COPY_CHUNK = PIN_CHUNK  # 1 GiB: copy and checksum overlap chunk by chunk; only the last check shows
# (measured on an H200: 1 GiB chunks verify at no cost, 256 MiB chunks cost ~7 ms in stream switches)


@dataclass(frozen=True, slots=True)
class Block:
    start: int
    end: int
    resident: bool  # stays on the device while asleep

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def plan_blocks(layout: ArenaLayout, keep_layers: int) -> list[Block]:
    kept = {(s.start, s.end) for s in layout.resident_segments(keep_layers)}
    blocks: list[Block] = []
    for seg in sorted(layout.segments, key=lambda s: s.start):
        resident = (seg.start, seg.end) in kept
        if blocks and blocks[-1].resident == resident and blocks[-1].end == seg.start:
            blocks[-1] = Block(blocks[-1].start, seg.end, resident)
        else:
            blocks.append(Block(seg.start, seg.end, resident))
    return blocks


class DeviceArena:
    def __init__(self, layout: ArenaLayout, device: torch.device, keep_layers: int = 0, vmm: str = "auto"):
        self.layout = layout
        self.device = device
        self.blocks = plan_blocks(layout, keep_layers)
        self._starts = [b.start for b in self.blocks]
        self._vrange: VirtualRange | None = None
        self._tensors: dict[int, torch.Tensor] = {}  # block start -> uint8 tensor, for present blocks
        self._verify_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queued_chunks: list[tuple[int, int]] = []
        reason = vmm_unavailable_reason(device) if vmm != "off" else "vmm is off"
        if reason is None:
            vrange = VirtualRange(device, layout.total_bytes)
            if all(b.start % vrange.granularity == 0 for b in self.blocks):
                self._vrange = vrange
            else:
                reason = f"VMM granularity {vrange.granularity} does not divide the layout's segments"
                vrange.close()
        if reason is not None:
            if vmm == "on":
                raise RuntimeError(f"vmm=on, but CUDA VMM cannot be used: {reason}")
            log.info("arena re-allocates on wake (%s)", reason)

    @property
    def stable_addresses(self) -> bool:
        return self._vrange is not None

    @property
    def present_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks if b.start in self._tensors)

    def released_blocks(self) -> list[Block]:
        return [b for b in self.blocks if not b.resident]

    def missing_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.start not in self._tensors]

    def allocate(self) -> list[Block]:
        """Give memory to every block that has none; returns those blocks (their contents are undefined)."""
        missing = self.missing_blocks()
        try:
            for block in missing:
                self._tensors[block.start] = self._new_block(block)
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

    def _drop_block(self, block: Block) -> None:
        if self._tensors.pop(block.start, None) is not None and self._vrange is not None:
            self._vrange.unmap(block.start)

    def release(self) -> int:
        """Free every non-resident block; returns the bytes given back."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no kernel may still read what we unmap
        freed = 0
        for block in self.released_blocks():
            if block.start in self._tensors:
                self._drop_block(block)
                freed += block.nbytes
        return freed

    def copy_from(self, host: torch.Tensor, blocks: list[Block], expected: torch.Tensor | None = None,
                  staging: StagingRing | None = None) -> torch.Tensor | None:
        """Queue the copy of `blocks` from the host mirror; with `expected` (all block sums, on this device),
        also queue their verification, chunk by chunk on a side stream so that it overlaps the copy.
        `staging` carries the copy through pinned buffers when the mirror is not pinned (yet).

        Returns a device tensor of per-chunk mismatch flags to hand to `confirm` (None without `expected`).
        """
        size = staging.nbytes if staging is not None else COPY_CHUNK
        chunks = [(lo, min(b.end, (lo // size + 1) * size)) for b in blocks
                  for lo in [b.start, *range((b.start // size + 1) * size, b.end, size)]]
        main = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        flags = []
        for lo, hi in chunks:
            block = self.blocks[bisect.bisect_right(self._starts, lo) - 1]
            dst = self._tensors[block.start][lo - block.start : hi - block.start]
            if staging is not None:
                staging.send(dst, host[lo:hi])
            else:
                dst.copy_(host[lo:hi], non_blocking=True)
            if expected is None:
                continue
            want = expected[lo // BLOCK_BYTES : hi // BLOCK_BYTES]
            if main is None:
                flags.append((block_sums(dst) != want).any())
                continue
            self._verify_stream.wait_stream(main)  # after this chunk's copy, not the ones queued later
            with torch.cuda.stream(self._verify_stream):
                flags.append((block_sums(dst) != want).any())
        self._queued_chunks = chunks
        if expected is None:
            return None
        if main is not None:
            main.wait_stream(self._verify_stream)
        return torch.stack(flags)

    def confirm(self, flags: torch.Tensor | None) -> None:
        """Wait for a queued verification; raise PoolCorruptError naming the first bad chunk's group."""
        if flags is None or not bool(flags.any()):
            return
        lo, hi = self._queued_chunks[int(flags.nonzero()[0, 0])]
        groups = sorted({s.group for s in self.layout.segments if s.start < hi and lo < s.end})
        raise PoolCorruptError(f"weight pool checksum mismatch in bytes {lo:,}-{hi:,} ({', '.join(groups)})")

    def checksums(self) -> torch.Tensor:
        """Block sums of the whole arena (every block must be present), computed where the arena lives."""
        return torch.cat([block_sums(self._tensors[b.start]) for b in self.blocks])

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
        if self._vrange is not None:
            self._vrange.close()
            self._vrange = None
