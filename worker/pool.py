"""The host mirror of the arena: a POSIX shared-memory file written once, pinned for DMA, shared by workers.

Files in `shm_dir` (normally /dev/shm), both mode 0600:
  <name>.pool            the arena's bytes, zero-padded exactly as the layout says
  <name>.manifest.json   identity, dtype, layout and a checksum per 2 MiB block; written last, so a pool
                         without a manifest is one whose creation did not finish
A pool is built under `<name>.pool.tmp-<pid>` and renamed into place only once it is complete and verified.
Every WeightPool holds a shared flock on its data file until `close`, so that `poolfiles.remove_pool_files` (a
daemon's shutdown) leaves a pool alone while a worker of any daemon still has it open.
"""
from __future__ import annotations

import base64
import hashlib
import re
import errno
import fcntl
import json
import logging
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from . import faults, poolfiles
from .errors import PoolCapacityError, PoolCorruptError, PoolOwnershipError
from .layout import SEGMENT_ALIGN, ArenaLayout

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: pool formats (raw, compressed)
BLOCK_BYTES = SEGMENT_ALIGN
PIN_CHUNK = 1 << 30  # bytes per cudaHostRegister call; copies never straddle two (arena.COPY_CHUNK)
PIN_THREADS = 2  # a fresh mapping pins no faster with more (H200 host: 1.9 s with 1 thread, 2.0 s with 8)


HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every context, whatever the thread's device


def _register(ptr: int, nbytes: int, device: torch.device) -> bool:
    torch.cuda.set_device(device)  # a fresh thread would otherwise bring up device 0's context
    rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, HOST_REGISTER_PORTABLE)
    if int(rc) != 0:
        log.warning("could not pin %d bytes of the weight pool (%s); they copy at pageable speed", nbytes, rc)
    return int(rc) == 0


def block_sums(data: torch.Tensor) -> torch.Tensor:
    """Wrapping int64 sum of each 2 MiB block of a uint8 tensor, on whatever device holds it.

    An integrity check, not a cryptographic one: it catches flipped bits, zeroed or truncated pages and
    stale files, and costs one read of the bytes (a few milliseconds for a 7B arena on a GPU).
    """
    return data.view(torch.int64).view(-1, BLOCK_BYTES // 8).sum(dim=1)


def host_capacity(shm_dir: Path) -> tuple[int, int]:
    """(bytes free in shm_dir, bytes of host RAM available)."""
    st = os.statvfs(shm_dir)
    override = faults.shm_free_override()
    return override if override is not None else st.f_bavail * st.f_frsize, psutil.virtual_memory().available


@dataclass(slots=True)
class PoolManifest:
    name: str
    identity: str
    dtype: str
    layout: ArenaLayout
    block_sums: np.ndarray  # int64, one per BLOCK_BYTES of the (decoded) arena
    created_unix: float
    format: str = "raw"  # or "compressed": the file holds `chunks` (compressed.py), not the arena's bytes
    chunks: list = field(default_factory=list)  # compressed.ChunkEntry, in file order
    version: int = MANIFEST_VERSION

    @property
    def file_bytes(self) -> int:
        """The data file's size."""
        if self.format == "raw":
            return self.layout.total_bytes
        return max((c.offset + c.nbytes for c in self.chunks), default=0)

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version, "name": self.name, "identity": self.identity, "dtype": self.dtype,
            "created_unix": self.created_unix, "block_bytes": BLOCK_BYTES, "format": self.format,
            "chunks": [c.to_list() for c in self.chunks],
            "block_sums": base64.b64encode(self.block_sums.astype("<i8").tobytes()).decode(),
            "layout": self.layout.to_json(),
        })

    @classmethod
    def from_json(cls, text: str) -> PoolManifest:
        from .compressed import POOL_FORMATS, ChunkEntry, check_entries

        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION or data.get("block_bytes") != BLOCK_BYTES:
            raise ValueError(f"manifest version {data.get('version')} / block size {data.get('block_bytes')}")
        if data.get("format") not in POOL_FORMATS[1:]:
            raise ValueError(f"unknown pool format {data.get('format')!r}")
        sums = np.frombuffer(base64.b64decode(data["block_sums"]), dtype="<i8").astype(np.int64)
        manifest = cls(data["name"], data["identity"], data["dtype"], ArenaLayout.from_json(data["layout"]), sums,
                       data["created_unix"], data["format"], [ChunkEntry.from_list(c) for c in data["chunks"]])
        if manifest.format != "raw":
            check_entries(manifest.chunks, manifest.layout, manifest.file_bytes)
        return manifest


def _check_private(path: Path) -> os.stat_result:
    st = path.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PoolOwnershipError(
            f"{path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}; a pool must belong to uid "
            f"{os.geteuid()} with mode 600 - refusing to attach (remove it if it is yours)"
        )
    return st


class WeightPool:
    """One mapped pool file. Build with `create`, find with `open`."""

    def __init__(self, path: Path, nbytes: int, fd: int):
        self.path = path
        self.nbytes = nbytes
        self._fd = fd
        fcntl.flock(fd, fcntl.LOCK_SH)  # "in use": held until close (waits only while a removal is deleting it)
        self._mmap = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._pin_jobs: list = []  # one future per PIN_CHUNK: True once registered
        self._pin_pool: ThreadPoolExecutor | None = None
        self._pin_started = 0.0
        self.manifest: PoolManifest | None = None

    data_path = staticmethod(poolfiles.data_path)
    manifest_path = staticmethod(poolfiles.manifest_path)

    # -- finding and building -------------------------------------------------------------------------------
    @classmethod
    def open(cls, shm_dir: Path, name: str) -> WeightPool | None:
        """The published pool called `name`, or None. Raises PoolCorruptError for a broken one,
        PoolOwnershipError for one we must not trust."""
        data, manifest_file = cls.data_path(shm_dir, name), cls.manifest_path(shm_dir, name)
        if not manifest_file.exists() or not data.exists():
            return None
        _check_private(manifest_file)
        st = _check_private(data)
        try:
            manifest = PoolManifest.from_json(manifest_file.read_text())
        except (ValueError, KeyError, TypeError) as exc:
            raise PoolCorruptError(f"{manifest_file} is unreadable: {exc}") from exc
        if st.st_size != manifest.file_bytes:
            raise PoolCorruptError(f"{data} is {st.st_size:,} bytes, its manifest says {manifest.file_bytes:,}")
        fd = os.open(data, os.O_RDWR)
        try:
            pool = cls(data, manifest.file_bytes, fd)
        except BaseException:
            os.close(fd)
            raise
        if not poolfiles._same_file(fd, data) or not manifest_file.exists():  # removed while we took the lock
            pool.close()
            return cls.open(shm_dir, name)
        pool.manifest = manifest
        return pool

    @classmethod
    def create(cls, shm_dir: Path, name: str, nbytes: int) -> WeightPool:
        """An unpublished, zero-filled pool under a temporary name; `publish` or `discard` it."""
        shm_free, ram = host_capacity(shm_dir)
        if nbytes > shm_free or nbytes > ram:
            raise PoolCapacityError(
                f"the weight pool needs {nbytes:,} bytes; {shm_dir} has {shm_free:,} bytes free and host RAM has "
                f"{ram:,} bytes available (in Docker, raise --shm-size or use ipc: host)"
            )
        remove_stale(shm_dir, name)
        path = Path(shm_dir) / f"{name}.pool.tmp-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve every page now: on tmpfs a later write past the free space would be a SIGBUS, not an error.
            os.posix_fallocate(fd, 0, nbytes)
            return cls(path, nbytes, fd)  # the shared lock follows the file through publish's rename
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise PoolCapacityError(f"{shm_dir} could not reserve {nbytes:,} bytes for the weight pool: {exc}") from exc
            raise
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    def publish(self, manifest: PoolManifest) -> None:
        """Rename into place, then write the manifest (the marker that the pool is complete)."""
        shm_dir = self.path.parent
        final = self.data_path(shm_dir, manifest.name)
        os.replace(self.path, final)
        self.path = final
        tmp = shm_dir / f"{manifest.name}.manifest.json.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
        os.replace(tmp, self.manifest_path(shm_dir, manifest.name))
        self.manifest = manifest

    def discard(self) -> None:
        """Close and delete an unpublished pool."""
        self.close()
        self.path.unlink(missing_ok=True)

    # -- use ------------------------------------------------------------------------------------------------
    def pin(self, device: torch.device, threads: int = PIN_THREADS) -> None:
        """Start page-locking the mapping for DMA (cudaHostRegister; hipHostRegister on ROCm builds of torch),
        PIN_CHUNK bytes at a time on `threads` threads, in the background (`wait_pinned` waits). Until it is
        done, wakes copy through a staging ring. A chunk the driver refuses stays pageable: copies from it
        are slower, not wrong."""
        if self._pin_jobs:
            return
        self._pin_started = time.perf_counter()
        self._pin_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pin")
        base = self.tensor.data_ptr()
        self._pin_jobs = [self._pin_pool.submit(_register, base + lo, min(PIN_CHUNK, self.nbytes - lo), device)
                          for lo in range(0, self.nbytes, PIN_CHUNK)]

    def wait_pinned(self) -> bool:
        """Wait until every chunk is pinned; True if the driver accepted them all."""
        ok = all(job.result() for job in self._pin_jobs)
        if self._pin_pool is not None:
            self._pin_pool.shutdown()
            self._pin_pool = None
            log.info("pinned %s bytes of %s in %.3f s%s", f"{self.nbytes:,}", self.path.name,
                     time.perf_counter() - self._pin_started, "" if ok else " (some chunks refused: pageable)")
        return ok

    @property
    def pinned(self) -> bool:
        return bool(self._pin_jobs) and all(job.done() and job.result() for job in self._pin_jobs)

    def unpin(self) -> None:
        base = self.tensor.data_ptr()
        for lo, job in zip(range(0, self.nbytes, PIN_CHUNK), self._pin_jobs):
            if job.result():
                torch.cuda.cudart().cudaHostUnregister(base + lo)
        self._pin_jobs = []
        if self._pin_pool is not None:
            self._pin_pool.shutdown()
            self._pin_pool = None

    def check_intact(self) -> None:
        """Cheap check before reading the mapping: a file truncated under us would fault (SIGBUS) on access."""
        try:
            size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise PoolCorruptError(f"{self.path}: {exc}") from exc
        if size != self.nbytes:
            raise PoolCorruptError(f"{self.path} shrank to {size:,} bytes (expected {self.nbytes:,})")

    def close(self) -> None:
        """Unmap the pool (once no view of `tensor` is left) and release its shared lock."""
        if self._fd < 0:
            return
        self.unpin()
        # torch.frombuffer keeps a reference to the mmap, not a buffer export (mmap.close() would unmap under live
        # views: a segfault on their next read), so drop ours and let the last view's release unmap it.
        self.tensor = None
        self._mmap = None
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # unlocks the file description the mmap's own dup of the fd shares
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        """Remove the pool's files, whoever else has it open: for a pool that proved corrupt (or a level-2 sleep),
        which its owner must be able to drop and rebuild even while other workers are attached. That is safe on
        Linux: their mappings stay valid (the memory is freed when the last one closes), and nobody new can attach
        to what is no longer there. `poolfiles.remove_pool_files` is the polite removal that respects holders."""
        if self.manifest is not None:
            self.manifest_path(self.path.parent, self.manifest.name).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def remove_stale(shm_dir: Path, name: str) -> None:
    """Delete temporary files of `name` left by processes that died while building it."""
    for tmp in Path(shm_dir).glob(f"{name}.*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            log.warning("removing %s, left by process %s", tmp, pid)
            tmp.unlink(missing_ok=True)


def pool_name(prefix: str, source, dtype: torch.dtype, layout: ArenaLayout, pool_format: str = "raw") -> str:
    """Named after the model's identity, dtype, layout and the pool's format: a pool is only ever attached by an
    equal model, and a pool of one format is never taken for the other."""
    key = f"{MANIFEST_VERSION}|{source.identity}|{dtype}|{layout.signature()}|{pool_format}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", source.name.rsplit("/", 1)[-1]).strip("-").lower()[:40]
    return f"{prefix}-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
