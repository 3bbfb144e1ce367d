"""The worker's one configuration object."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ksleep.v1 import forkserver_pb2

from .names import MODES, POOL_FORMATS
from .limits import INT_RANGES, PREFILL_CHUNK, check_int, parse_kv_cache

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
VMM_MODES = ("auto", "on", "off")
GRAPH_MODES = MODES


def default_cache_dir() -> Path:
    """Where converted and downloaded models live: $KSLEEP_CACHE_DIR, else ~/.cache/ksleep."""
    env = os.environ.get("KSLEEP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ksleep"


def default_model_dir(cache_dir: Path) -> Path:
    """Where ModelScope snapshots are downloaded: $KSLEEP_MODEL_DIR, else <cache_dir>/modelscope."""
    env = os.environ.get("KSLEEP_MODEL_DIR")
    return Path(env).expanduser() if env else cache_dir / "modelscope"


@dataclass(slots=True)
class WorkerConfig:
    """Everything that decides how a model is loaded, pooled, put to sleep and woken.

    model: a local Hugging Face directory, a ModelScope id (org/name), `smollm2-135m` (embedded) or
        `synthetic:<preset>`.
    device: `auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`. Resolved only when the model
        is loaded, so that a forkserver parent can hold a config without touching CUDA.
    dtype: `auto` (bfloat16), `bfloat16`, `float16` or `float32`.
    keep_layers: the last N decoder layers stay on the device during a sleep.
    cache_dir / model_dir: converted models / ModelScope downloads (env KSLEEP_CACHE_DIR / KSLEEP_MODEL_DIR).
    shm_dir, pool_prefix: where the shared-memory pool lives and how its files are named.
    vmm: `auto` uses CUDA virtual memory management (stable arena addresses) when available; `on` requires
        it; `off` re-allocates the arena on every wake.
    verify_on_wake: checksum the arena against the manifest after every wake from the mirror, not only on
        attach (catches a mirror corrupted while we slept; costs one read of the arena on the device, which
        contends with the copy: ~10 ms of a 0.29 s 7B wake on an H200, measured).
    cuda_graphs: `auto` replays steps from CUDA graphs where they apply (a GPU whose torch has the varlen flash
        kernel); `on` requires them (loading fails where they do not apply); `off` runs every step eagerly.
    fused_kernels: `auto` runs each RMSNorm, rotary embedding and SiLU x up as one kernel compiled by
        torch.compile (Triton) on a GPU, and falls back to transformers' modules if compiling fails; `on`
        requires it; `off` keeps transformers' modules (fusion.py).
    pool_format: how the shared-memory pool holds the weights: `raw` (the arena's bytes), `compressed` (bf16
        exponents entropy-coded, ~0.67 of the bytes, decoded on the device as a wake lands: compressed.py), or
        `auto` (compressed where the Triton decoder passes its self-test on a GPU, raw elsewhere).
    kv_cache: the batch KV cache's size: `auto` (half the device memory free once the weights are placed, 256 MiB
        on CPU), a fraction of that free memory (`0.3`), or bytes (`8GiB`, `512MiB`, `1000000000`).
    max_batch: sequences that run at once (more wait in the queue).
    max_queue: requests that may wait for the batch; one more is refused (QueueFullError, RESOURCE_EXHAUSTED).
    prefill_chunk: tokens a step feeds while sequences decode (theirs included): how long a prompt may hold the
        running decodes per step.
    seed: seed of `synthetic:` weights.
    weights_version: updates behind `model` (ksleepd sets it when it respawns a worker on updated weights).
    load_threads: parallel readers when a checkpoint is read into the mirror.
    """

    model: str = "smollm2-135m"
    device: str = "auto"
    dtype: str = "auto"
    keep_layers: int = 0
    cache_dir: Path | None = None
    model_dir: Path | None = None
    shm_dir: Path = field(default_factory=lambda: Path("/dev/shm"))
    pool_prefix: str = "ksleep"
    vmm: str = "auto"
    verify_on_wake: bool = True
    seed: int = 0
    trust_remote_code: bool = False
    load_threads: int = 8
    cuda_graphs: str = "auto"
    fused_kernels: str = "auto"
    pool_format: str = "auto"
    kv_cache: str = "auto"
    max_batch: int = 128
    max_queue: int = 1024
    prefill_chunk: int = PREFILL_CHUNK
    weights_version: int = 0

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            raise ValueError("model must be a non-empty name")
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except RuntimeError as exc:
                raise ValueError(f"device {self.device!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"device {self.device!r} is not supported (auto, cpu, cuda, cuda:N)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if not isinstance(self.keep_layers, int) or self.keep_layers < 0:
            raise ValueError(f"keep_layers must be an integer >= 0, got {self.keep_layers!r}")
        if self.vmm not in VMM_MODES:
            raise ValueError(f"vmm {self.vmm!r} is not one of {', '.join(VMM_MODES)}")
        if not self.pool_prefix or "/" in self.pool_prefix:
            raise ValueError(f"pool_prefix {self.pool_prefix!r} must be a non-empty file-name prefix")
        if self.cuda_graphs not in GRAPH_MODES:
            raise ValueError(f"cuda_graphs {self.cuda_graphs!r} is not one of {', '.join(GRAPH_MODES)}")
        if self.fused_kernels not in GRAPH_MODES:
            raise ValueError(f"fused_kernels {self.fused_kernels!r} is not one of {', '.join(GRAPH_MODES)}")
        if self.pool_format not in POOL_FORMATS:
            raise ValueError(f"pool_format {self.pool_format!r} is not one of {', '.join(POOL_FORMATS)}")
        if self.pool_format == "compressed" and self.dtype not in ("auto", "bfloat16"):
            raise ValueError(f"pool_format=compressed codes bfloat16 weights, not {self.dtype}")
        parse_kv_cache(self.kv_cache)  # ValueError naming the setting
        for name in INT_RANGES:
            check_int(name, getattr(self, name))
        if self.load_threads < 1:
            raise ValueError("load_threads must be >= 1")
        self.shm_dir = Path(self.shm_dir)
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        self.model_dir = Path(self.model_dir).expanduser() if self.model_dir else default_model_dir(self.cache_dir)

    @classmethod
    def from_pb(cls, pb: forkserver_pb2.WorkerSettings) -> WorkerConfig:
        return cls(model=pb.model, device=pb.device or "auto", dtype=pb.dtype or "auto", keep_layers=pb.keep_layers,
                   cache_dir=pb.cache_dir or None, model_dir=pb.model_dir or None, shm_dir=pb.shm_dir or "/dev/shm",
                   pool_prefix=pb.pool_prefix or "ksleep", vmm=pb.vmm or "auto", trust_remote_code=pb.trust_remote_code,
                   cuda_graphs=pb.cuda_graphs or "auto", kv_cache=pb.kv_cache or "auto",
                   fused_kernels=pb.fused_kernels or "auto", pool_format=pb.pool_format or "auto",
                   weights_version=pb.weights_version, seed=pb.seed,
                   max_batch=pb.max_batch or 128, max_queue=pb.max_queue if pb.HasField("max_queue") else 1024,
                   prefill_chunk=pb.prefill_chunk or PREFILL_CHUNK, verify_on_wake=not pb.skip_wake_checksums)

    def to_pb(self, **extra) -> forkserver_pb2.WorkerSettings:
        """The settings message for a worker; `extra` sets the fields that are not the engine's (socket_path...)."""
        return forkserver_pb2.WorkerSettings(
            model=self.model, device=self.device, dtype=self.dtype, keep_layers=self.keep_layers,
            cache_dir=str(self.cache_dir), model_dir=str(self.model_dir), shm_dir=str(self.shm_dir),
            pool_prefix=self.pool_prefix, vmm=self.vmm, trust_remote_code=self.trust_remote_code,
            cuda_graphs=self.cuda_graphs, kv_cache=self.kv_cache, max_batch=self.max_batch,
            fused_kernels=self.fused_kernels, pool_format=self.pool_format, weights_version=self.weights_version, seed=self.seed,
            max_queue=self.max_queue, prefill_chunk=self.prefill_chunk,
            skip_wake_checksums=not self.verify_on_wake, **extra)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES["bfloat16" if self.dtype == "auto" else self.dtype]

    def resolve_device(self) -> torch.device:
        """The concrete device; touches CUDA, so call it in the process that owns the GPU."""
        if self.device == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} was asked for but no CUDA/ROCm device is visible")
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise ValueError(f"device {self.device!r}: only {torch.cuda.device_count()} device(s) visible")
            return torch.device("cuda", index)
        return device
