"""Staging new weights for UpdateWeights in shared memory: a trainer's tensors go to tmpfs, never to a disk and
never through gRPC messages.

    with WeightWriter() as staged:                  # a private folder in /dev/shm
        for name, tensor in model.state_dict().items():
            staged.write(name, tensor)
        client.update_weights(staged.commit())      # the daemon reads the folder as a checkpoint

The folder holds safetensors shards only; the daemon adds the served model's config.json and tokenizer files, so
that it is a complete checkpoint (a worker restarted later reloads from it when the pool is gone). Keep the writer
open while the daemon may need it (until the next update); closing it deletes the folder. torch and safetensors
are imported only here, so the rest of the client stays free of them.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SHARD_BYTES = 4 << 30


class WeightWriter:
    def __init__(self, shm_dir: str | Path = "/dev/shm", shard_bytes: int = SHARD_BYTES):
        self.directory = Path(tempfile.mkdtemp(prefix="ksleep-update-", dir=shm_dir))  # mode 0700
        self._shard_bytes = shard_bytes
        self._pending: dict = {}
        self._pending_bytes = 0
        self._shards = 0
        self._names: set[str] = set()

    def write(self, name: str, tensor) -> None:
        """Stage one tensor under its parameter name (as in the model's state_dict)."""
        if name in self._names:
            raise ValueError(f"{name} was written already")
        self._names.add(name)
        value = tensor.detach().contiguous().cpu()
        self._pending[name] = value
        self._pending_bytes += value.numel() * value.element_size()
        if self._pending_bytes >= self._shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        save_file(self._pending, str(self.directory / f"model-{self._shards:05d}.safetensors"), metadata={"format": "pt"})
        self._shards += 1
        self._pending, self._pending_bytes = {}, 0

    def commit(self) -> str:
        """Write what is staged; returns the folder to pass to update_weights."""
        self._flush()
        if not self._shards:
            raise ValueError("no tensor was written")
        return str(self.directory)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> WeightWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
