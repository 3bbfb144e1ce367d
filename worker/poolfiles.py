"""Names of a pool's files, and their removal (no torch here: the supervisor uses this to clean up).

Every process that has a pool open (a WeightPool, created or attached) holds a shared flock on its data file
for as long as it has it open; a pool is only removed when nobody holds it (see `remove_pool_files`).
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def data_path(shm_dir: Path | str, name: str) -> Path:
    return Path(shm_dir) / f"{name}.pool"


def manifest_path(shm_dir: Path | str, name: str) -> Path:
    return Path(shm_dir) / f"{name}.manifest.json"


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced since we opened it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def remove_pool_files(shm_dir: Path | str, name: str, in_use_too: bool = False) -> bool:
    """Delete a pool (manifest first, so that nobody attaches to a half-deleted one) unless another process still
    has it open: then leave it, logged at INFO, for its last user's daemon to remove. True if it is gone.

    Holders keep a shared flock on the data file; an exclusive one taken without waiting on a fresh descriptor
    succeeds only when there are none (flock locks belong to open file descriptions, so a WeightPool of this
    very process counts as a holder too: close it first). The files are deleted while that lock is held."""
    data, manifest = data_path(shm_dir, name), manifest_path(shm_dir, name)
    if in_use_too:  # a pool that proved corrupt: gone for everyone (their mappings stay valid until closed)
        manifest.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        return True
    for _ in range(3):  # the data file replaced by a newly published pool between our open and our lock: again
        try:
            fd = os.open(data, os.O_RDONLY)
        except FileNotFoundError:
            manifest.unlink(missing_ok=True)  # a manifest without its data is no pool
            return True
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("the weight pool %s is still in use by another process; leaving its files", name)
                return False
            if not _same_file(fd, data):
                continue
            manifest.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)  # releases the exclusive lock
    log.info("the weight pool %s keeps being replaced; leaving its files", name)
    return False
