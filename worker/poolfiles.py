"""Names of a pool's files (no torch here: the supervisor uses this to clean up)."""
from __future__ import annotations

from pathlib import Path


def data_path(shm_dir: Path | str, name: str) -> Path:
    return Path(shm_dir) / f"{name}.pool"


def manifest_path(shm_dir: Path | str, name: str) -> Path:
    return Path(shm_dir) / f"{name}.manifest.json"


def remove_pool_files(shm_dir: Path | str, name: str) -> None:
    """Delete a pool (manifest first, so that nobody attaches to a half-deleted one)."""
    manifest_path(shm_dir, name).unlink(missing_ok=True)
    data_path(shm_dir, name).unlink(missing_ok=True)
