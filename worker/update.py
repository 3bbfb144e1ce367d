"""New weights for a loaded model (the RL loop): a pool built beside the one in use, then swapped in between steps.

    engine.update_weights("/ckpt/step-200")   # a trainer's save_pretrained directory (safetensors)

The new pool is built (or attached, if another worker built it already) in the caller's thread while the
engine goes on serving the old weights: it is checked against the model's layout (every parameter's name and
shape; a mismatch is a ValidationError naming the tensor, and nothing changes), checksummed and published under
its own name. Then, between two steps, an awake engine sleeps (waiting requests refused with BusyError unless
`abort`), the pools are swapped and it wakes with the usual single bulk copy; an asleep one just swaps. The old
pool is removed once no worker has it open. So no request ever computes with a mix of the two.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ksleep.v1 import common_pb2, worker_pb2

from . import compressed
from .errors import ModelNotFoundError, UnsupportedModelError, ValidationError
from .pool import PoolManifest, WeightPool, block_sums, pool_name


@dataclass(frozen=True, slots=True)
class WeightsVersion:
    """Which weights the model computes with: 0 for those it was started on, +1 per update."""

    number: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)

    def to_pb(self) -> common_pb2.WeightsVersion:
        return common_pb2.WeightsVersion(number=self.number, source=self.source)


@dataclass(frozen=True, slots=True)
class UpdateResult:
    version: WeightsVersion
    seconds: float  # the whole update
    stage_seconds: float  # building (or attaching) the new pool, while the old weights served
    swap_seconds: float  # sleep, swap, wake: the time requests were held
    pool: str  # "created" or "attached"

    def to_dict(self) -> dict:
        return asdict(self)

    def to_pb(self) -> worker_pb2.WorkerUpdateWeightsResponse:
        return worker_pb2.WorkerUpdateWeightsResponse(weights=self.version.to_pb(), seconds=self.seconds,
                                                      stage_seconds=self.stage_seconds,
                                                      swap_seconds=self.swap_seconds, pool=self.pool)


def checkpoint_source(directory: str | Path, trust_remote_code: bool = False):
    """The update's source; a path that is not a checkpoint is a ValidationError."""
    from .source import CheckpointSource

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ValidationError(f"weights directory {path} does not exist")
    try:
        return CheckpointSource(str(path), path, trust_remote_code)
    except ModelNotFoundError as exc:
        raise ValidationError(str(exc)) from None


def stage_pool(weights, source) -> tuple[WeightPool, str]:
    """The published pool of `source`'s weights in `weights`' layout and format: (pool, "created" | "attached").
    Touches neither the arena nor the pool in use."""
    config, layout = weights.config, weights.layout
    name = pool_name(config.pool_prefix, source, config.torch_dtype, layout, weights.pool_format)
    if name == weights.pool_name:
        raise ValidationError(f"the model already computes with these weights ({source.identity})")
    existing = WeightPool.open(config.shm_dir, name)
    if existing is not None:
        return existing, "attached"
    coded = weights.pool_format == compressed.COMPRESSED
    pool = None if coded else WeightPool.create(config.shm_dir, name, layout.total_bytes)
    try:
        host = torch.zeros(layout.total_bytes, dtype=torch.uint8) if coded else pool.tensor
        try:
            weights.write_weights(source, host)
        except UnsupportedModelError as exc:  # a missing tensor or a wrong shape: the caller's weights are wrong
            raise ValidationError(f"the new weights do not fit the model: {exc}") from None
        sums = block_sums(host).numpy()
        if coded:  # coded where the arena lives (on a GPU: fast), one chunk at a time
            return compressed.write_pool(config.shm_dir, name, source.identity, str(config.torch_dtype), layout, sums,
                                         lambda c: host[c.start:c.end].to(weights.device), weights.device,
                                         pin=False), "created"
        pool.publish(PoolManifest(name, source.identity, str(config.torch_dtype), layout, sums, time.time()))
    except BaseException:
        if pool is not None:
            pool.discard()
        raise
    return pool, "created"
