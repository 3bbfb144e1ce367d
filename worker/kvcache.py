"""The batch KV cache: every running sequence's keys and values in one block of device memory.

Position-major: [tokens, layers, key|value, kv_heads, head_dim] in the arena's scratch (arena.py), so that the
positions [a, b) of every layer are one byte range [a, b) x `position_bytes`: with CUDA VMM the arena maps the
cache piece by piece as extents are handed out (`reserve`), a sleep unmaps only what was used and a wake maps
only the head (the pad positions and what a padding sequence reads). Each layer's keys are a strided
[tokens, kv_heads, head_dim] view, which the flash kernel reads in place. Released on sleep, mapped back at the
same address on wake (the graphs that captured it stay valid), never copied (a sleeping model has no sequences).

A sequence owns one contiguous extent of positions, reserved when it is admitted, for its prompt, its max_tokens
and one more (the decode step that samples its last token writes that token's key and value). So a running
sequence never runs out of room, nothing is ever preempted, and a request that cannot be given an extent waits
in the queue instead of failing. Contiguous extents let torch's varlen flash kernel read each sequence in place
(attention.py); a paged layout would need a block table, which torch's kernel does not take in every release we
support (2.11 on the GPU image).

The first PAD_TOKENS positions are never handed out: the padding rows of a graph-captured batch write there.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from .limits import PAD_TOKENS, parse_kv_cache

GRANULE = 16  # extents are multiples of this many positions (less bookkeeping, less fragmentation)
ACTIVATION_RESERVE = 2 << 30  # device bytes left to activations, graphs and cuBLAS when sizing by fraction
CPU_AUTO_BYTES = 256 << 20
GPU_AUTO_FRACTION = 0.5
# `auto` on a GPU stops at this many positions per batch slot: a bigger cache holds memory a shared GPU's other
# users could have (and, with every piece mapped, makes a sleep longer: ~0.65 ms per GiB unmapped on an H200)
AUTO_POSITIONS_PER_SLOT = 2048

@dataclass(frozen=True, slots=True)
class CacheSize:
    """`auto`, a fraction of the device memory free once the weights are placed (`0.3`), or bytes (`8GiB`)."""

    fraction: float | None = None
    nbytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> CacheSize:
        fraction, nbytes = parse_kv_cache(text)
        return cls(fraction, nbytes)

    def tokens(self, bytes_per_token: int, device: torch.device, weight_bytes: int, max_batch: int) -> int:
        """Cache positions this size gives on `device` (measured now: call before the weights are placed)."""
        if self.nbytes is not None:
            budget = self.nbytes
        else:
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0] - weight_bytes - ACTIVATION_RESERVE
                budget = int(max(0, free) * (self.fraction or GPU_AUTO_FRACTION))
                if self.fraction is None:
                    budget = min(budget, max_batch * AUTO_POSITIONS_PER_SLOT * bytes_per_token)
            elif self.fraction is None:
                budget = CPU_AUTO_BYTES
            else:
                budget = int(max(0, psutil.virtual_memory().available - weight_bytes) * self.fraction)
        tokens = budget // bytes_per_token // GRANULE * GRANULE
        if tokens < PAD_TOKENS + GRANULE:
            raise ValueError(f"a KV cache of {budget:,} bytes holds {budget // bytes_per_token} positions of "
                             f"{bytes_per_token:,} bytes; it needs at least {PAD_TOKENS + GRANULE}")
        return tokens


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """Key and value bytes one position costs across all layers."""
    return 2 * int(config.num_hidden_layers) * kv_heads(config) * head_dim(config) * dtype.itemsize


def kv_heads(config) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class KVCache:
    """Per-layer key and value views over one block of memory (`bind`), and the extents handed out in it."""

    def __init__(self, layers: int, heads: int, dim: int, tokens: int, dtype: torch.dtype):
        self.layers, self.heads, self.dim, self.tokens, self.dtype = layers, heads, dim, tokens, dtype
        self.position_bytes = 2 * layers * heads * dim * dtype.itemsize
        self.nbytes = tokens * self.position_bytes
        self.extents = ExtentAllocator(tokens, PAD_TOKENS)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # gives memory to cache bytes [lo, hi) before an extent there is used (the arena's map_scratch)
        self.backing: Callable[[int, int], None] | None = None

    def reserve(self, tokens: int) -> int | None:
        """The start of a new extent of at least `tokens` positions, its memory mapped; None when no free range
        is that long. Raises DeviceMemoryError (and reserves nothing) when the device has no room to map it."""
        start = self.extents.reserve(tokens)
        if start is not None and self.backing is not None:
            try:
                self.backing(start * self.position_bytes, (start + self.extents.size(start)) * self.position_bytes)
            except BaseException:
                self.extents.release(start)
                raise
        return start

    @classmethod
    def for_model(cls, config, dtype: torch.dtype, tokens: int) -> KVCache:
        return cls(int(config.num_hidden_layers), kv_heads(config), head_dim(config), tokens, dtype)

    @classmethod
    def standalone(cls, layers: int, heads: int, dim: int, tokens: int, dtype: torch.dtype,
                   device: torch.device) -> KVCache:
        """A cache in memory of its own (probes and tests)."""
        cache = cls(layers, heads, dim, tokens, dtype)
        cache.bind(torch.empty(cache.nbytes, dtype=torch.uint8, device=device))
        return cache

    def bind(self, block: torch.Tensor) -> None:
        """Point the views at `block` (uint8, at least `nbytes`; the arena's scratch while awake)."""
        flat = block[: self.nbytes].view(self.dtype).view(self.tokens, self.layers, 2, self.heads, self.dim)
        self.keys = [flat[:, i, 0] for i in range(self.layers)]
        self.values = [flat[:, i, 1] for i in range(self.layers)]

    def unbind(self) -> None:
        self.keys, self.values = [], []

    @property
    def bound(self) -> bool:
        return bool(self.keys)

    @property
    def usable_tokens(self) -> int:
        """The most positions one sequence can ever be given."""
        return self.tokens - PAD_TOKENS


class ExtentAllocator:
    """First-fit allocation of contiguous position ranges (extents) in [reserved, capacity)."""

    def __init__(self, capacity: int, reserved: int = 0):
        self.capacity, self.reserved = capacity, reserved
        self._free: list[tuple[int, int]] = [(reserved, capacity - reserved)] if capacity > reserved else []
        self._owned: dict[int, int] = {}  # start -> size

    def reserve(self, tokens: int) -> int | None:
        """The start of a new extent of at least `tokens` positions, or None when no free range is that long."""
        size = -(-tokens // GRANULE) * GRANULE
        for i, (start, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, length - size)
                self._owned[start] = size
                return start
        return None

    def size(self, start: int) -> int:
        """Positions of the extent at `start`."""
        return self._owned[start]

    def release(self, start: int) -> None:
        size = self._owned.pop(start)
        i = bisect.bisect(self._free, (start, size))
        self._free.insert(i, (start, size))
        if i + 1 < len(self._free) and start + size == self._free[i + 1][0]:  # merge with the next range
            self._free[i] = (start, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # and with the previous one
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + self._free[i - 1][1])

    @property
    def used(self) -> int:
        """Positions held by extents (rounded up to GRANULE)."""
        return sum(self._owned.values())

    @property
    def free(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)
