"""Where every weight lives in the arena: one region per dtype, tensors in execution order.

Each (dtype region, group) span starts on a 2 MiB boundary, so a group (the embeddings, one decoder layer, the
head) can be mapped, released or streamed on its own with CUDA VMM granularity, and the layout is the same on
every device, so one pool serves CPU and GPU workers alike. Gaps are zero in the mirror.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

import torch

SLOT_ALIGN = 256  # bytes; aligned tensor starts keep vectorised kernels on their fast path
SEGMENT_ALIGN = 2 << 20  # bytes; CUDA VMM's recommended granularity on current GPUs
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """One parameter or buffer: its bytes are arena[offset : offset + nbytes]."""

    name: str
    kind: str  # "param" | "buffer"
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    group: str  # "embed" | "layer.<i>" | "head"

    def view(self, arena: torch.Tensor) -> torch.Tensor:
        """This slot as a typed tensor inside `arena` (a uint8 tensor covering the whole layout)."""
        return arena[self.offset : self.offset + self.nbytes].view(getattr(torch, self.dtype)).view(self.shape)


@dataclass(frozen=True, slots=True)
class Segment:
    """A 2 MiB-aligned byte span holding one group's tensors of one dtype."""

    group: str
    dtype: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class ArenaLayout:
    slots: tuple[TensorSlot, ...]
    segments: tuple[Segment, ...]
    total_bytes: int
    num_layers: int

    @classmethod
    def plan(cls, tensors: list[tuple[str, str, torch.Tensor]], num_layers: int) -> ArenaLayout:
        """Lay out `(name, kind, tensor)` entries, given in registration order (shared tensors once)."""
        groups = ["embed"] + [f"layer.{i}" for i in range(num_layers)] + ["head"]
        seen_layer = False
        keyed = []
        for order, (name, kind, tensor) in enumerate(tensors):
            match = _LAYER.search("." + name)
            if match:
                seen_layer, group = True, f"layer.{match.group(1)}"
            else:  # buffers (rotary tables) are needed before layer 0, whatever their registration order
                group = "head" if seen_layer and kind == "param" else "embed"
            dtype = str(tensor.dtype).removeprefix("torch.")
            keyed.append((groups.index(group), order, name, kind, dtype, tuple(tensor.shape), tensor.nbytes, group))
        keyed.sort()
        # Regions in order of first use, so the copy that starts a wake brings the embeddings first.
        region_order = list(dict.fromkeys(k[4] for k in keyed))
        slots, segments, offset = [], [], 0
        for dtype in region_order:
            for group in groups:
                members = [k for k in keyed if k[4] == dtype and k[7] == group]
                if not members:
                    continue
                start = offset = _round_up(offset, SEGMENT_ALIGN)
                for _, _, name, kind, _, shape, nbytes, _ in members:
                    offset = _round_up(offset, SLOT_ALIGN)
                    slots.append(TensorSlot(name, kind, dtype, shape, offset, nbytes, group))
                    offset += nbytes
                segments.append(Segment(group, dtype, start, _round_up(offset, SEGMENT_ALIGN)))
                offset = segments[-1].end
        return cls(tuple(slots), tuple(segments), offset, num_layers)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the tensors themselves, without alignment padding."""
        return sum(s.nbytes for s in self.slots)

    def resident_segments(self, keep_layers: int) -> list[Segment]:
        """Segments that stay on the device during a sleep: those of the last `keep_layers` layers."""
        kept = {f"layer.{i}" for i in range(max(0, self.num_layers - keep_layers), self.num_layers)}
        return [s for s in self.segments if s.group in kept]

    def to_json(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "num_layers": self.num_layers,
            "slots": [asdict(s) for s in self.slots],
            "segments": [asdict(s) for s in self.segments],
        }

    @classmethod
    def from_json(cls, data: dict) -> ArenaLayout:
        slots = tuple(TensorSlot(**{**s, "shape": tuple(s["shape"])}) for s in data["slots"])
        return cls(slots, tuple(Segment(**s) for s in data["segments"]), data["total_bytes"], data["num_layers"])

    def signature(self) -> str:
        """A digest of the layout: two layouts with the same signature put every byte in the same place."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()
