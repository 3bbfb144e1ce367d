"""Reading safetensors checkpoints straight into the host mirror with parallel reads.

safetensors has no API for reading into a buffer we own, so the (tiny, documented) header is parsed here and
each tensor's bytes are read with pread into its place in the mirror: no per-tensor allocation, no pageable
staging copy. Tensors stored in another dtype are converted through safetensors' own loader.
"""
from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ModelNotFoundError, UnsupportedModelError

_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
READ_CHUNK = 64 << 20  # bytes per pread: big enough for full-speed I/O, small enough to spread over threads


@dataclass(frozen=True, slots=True)
class StoredTensor:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = StoredTensor(path, _DTYPES.get(info["dtype"], info["dtype"]), tuple(info["shape"]), base + begin, end - begin)
    return out


class SafetensorsCheckpoint:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{self.directory} has no *.safetensors files")
        self.tensors: dict[str, StoredTensor] = {}
        for path in files:
            self.tensors.update(read_header(path))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read_into(self, slots, host: torch.Tensor, threads: int = 8) -> int:
        """Fill each parameter slot of `host` (the mirror, uint8) from the checkpoint; returns bytes read."""
        missing = [s.name for s in slots if s.name not in self.tensors]
        if missing:
            raise UnsupportedModelError(f"{self.directory} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
        direct, converted = [], []
        for slot in slots:
            stored = self.tensors[slot.name]
            if tuple(stored.shape) != tuple(slot.shape):
                raise UnsupportedModelError(f"{slot.name}: checkpoint shape {stored.shape}, model expects {slot.shape}")
            (direct if stored.dtype == slot.dtype else converted).append((slot, stored))
        buffer = memoryview(host.numpy())
        fds = {p: os.open(p, os.O_RDONLY) for p in {stored.path for _, stored in direct}}
        try:
            jobs = [
                (fds[stored.path], stored.start + k, slot.offset + k, min(READ_CHUNK, slot.nbytes - k))
                for slot, stored in direct for k in range(0, slot.nbytes, READ_CHUNK)
            ]
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(lambda job: _pread_exact(buffer, *job), jobs))
        finally:
            for fd in fds.values():
                os.close(fd)
        for slot, stored in converted:
            with safe_open(stored.path, framework="pt") as f:
                slot.view(host).copy_(f.get_tensor(slot.name).to(getattr(torch, slot.dtype)))
        return sum(slot.nbytes for slot in slots)


def _pread_exact(buffer: memoryview, fd: int, file_offset: int, dest: int, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [buffer[dest + done : dest + nbytes]], file_offset + done)
        if n == 0:
            raise UnsupportedModelError(f"checkpoint file ended early at offset {file_offset + done}")
        done += n
