"""ksleepd's configuration: one dataclass, filled from flags, then KSLEEP_* environment variables, then an
optional TOML file, then defaults (the first that sets a field wins)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ksleep.v1 import forkserver_pb2
from ksleep.worker.names import POOL_FORMATS
from ksleep.worker.limits import INT_RANGES, PREFILL_CHUNK, check_int, parse_kv_cache

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
LOG_LEVELS = ("debug", "info", "warning", "error")
# what a [[models]] table may set for its model; the rest (addresses, limits, the control token) is the daemon's
PER_MODEL = frozenset({"keep_layers", "sleep_level", "idle_timeout", "cuda_graphs", "fused_kernels", "kv_cache",
                       "max_batch", "max_queue", "prefill_chunk", "pool_format", "dtype", "standby",
                       "trust_remote_code", "verify_wakes", "vmm", "seed", "served_name", "replicas", "devices",
                       "scale_out_at"})


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/ksleep, else /tmp/ksleep-<uid>: private (0700) folders for sockets."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "ksleep" if base else Path(f"/tmp/ksleep-{os.getuid()}")


def default_listen() -> str:
    return f"unix:{runtime_dir() / 'ksleepd.sock'}"


@dataclass(slots=True)
class DaemonConfig:
    """Each field is a flag (--idle-timeout), an environment variable (KSLEEP_IDLE_TIMEOUT) and a TOML key
    (idle_timeout). The `help` metadata is what `ksleepd start --help` prints."""

    model: str = field(default="smollm2-135m", metadata={"help": "local HF directory, ModelScope id (org/name), smollm2-135m or synthetic:<preset>"})
    device: str = field(default="auto", metadata={"help": DEVICES_HELP})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16), bfloat16, float16 or float32"})
    listen: str = field(default_factory=default_listen, metadata={"help": "unix:/path/to.sock or HOST:PORT (TCP; 127.0.0.1 unless you name another host)"})
    idle_timeout: float = field(default=300.0, metadata={"help": "seconds without requests before sleeping; 0 disables"})
    sleep_level: int = field(default=1, metadata={"help": "1: keep the pinned mirror; 2: drop it too; 3: stop the worker process"})
    keep_layers: int = field(default=0, metadata={"help": "last N decoder layers stay on the device while asleep"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    verify_wakes: bool = field(default=True, metadata={"help": "checksum every wake's copy on the device against the pool's manifest before the first token (about 10 ms of a 0.29 s 7B wake on an H200); off: only each worker's first wake from the pool"})
    standby: bool = field(default=False, metadata={"help": "keep a spare worker loaded, warmed up and asleep that replaces a worker that dies in about one wake instead of a spawn (costs its CUDA context, ~0.5-1 GB of device memory, also while asleep; stopped at sleep levels 2 and 3)"})
    keep_pool: bool = field(default=False, metadata={"help": "leave the weight pool in /dev/shm on shutdown"})
    cache_dir: str = field(default="", metadata={"help": "converted models (default $KSLEEP_CACHE_DIR or ~/.cache/ksleep)"})
    model_dir: str = field(default="", metadata={"help": "ModelScope downloads (default $KSLEEP_MODEL_DIR or <cache_dir>/modelscope)"})
    shm_dir: str = field(default="/dev/shm", metadata={"help": "where the weight pool lives"})
    pool_prefix: str = field(default="ksleep", metadata={"help": "file-name prefix of the pool"})
    vmm: str = field(default="auto", metadata={"help": "CUDA virtual memory for stable addresses: auto, on or off"})
    cuda_graphs: str = field(default="auto", metadata={"help": "replay steps from CUDA graphs: auto (where they apply: a GPU with torch's varlen flash kernel), on (required), off"})
    fused_kernels: str = field(default="auto", metadata={"help": "run each RMSNorm, rotary embedding and SiLU x up as one kernel compiled with torch.compile (Triton): auto (on a GPU; transformers' modules if compiling fails), on (required), off"})
    pool_format: str = field(default="auto", metadata={"help": "how the shared-memory pool holds the weights: raw, compressed (bf16 exponents entropy-coded: ~0.67 of the bytes, decoded on the device as a wake lands) or auto (compressed where the GPU decoder passes its self-test, else raw)"})
    kv_cache: str = field(default="auto", metadata={"help": "size of the batch KV cache: auto (half the device memory free once the weights are placed; 256MiB on CPU), a fraction of that (0.3) or bytes (8GiB)"})
    max_batch: int = field(default=128, metadata={"help": "requests decoded together in one batch; more wait in the queue"})
    max_queue: int = field(default=1024, metadata={"help": "requests that may wait for the batch; beyond, requests are refused with RESOURCE_EXHAUSTED"})
    prefill_chunk: int = field(default=PREFILL_CHUNK, metadata={"help": "tokens a step feeds while requests decode (theirs included): a long prompt delays them by one such step at a time"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the checkpoint (off: no code is loaded)"})
    grace: float = field(default=5.0, metadata={"help": "seconds a worker gets to stop after SIGTERM before SIGKILL"})
    worker_timeout: float = field(default=10.0, metadata={"help": "seconds a worker may leave health pings unanswered before it is declared hung, killed and restarted from the pool (requests without a token yet are replayed)"})
    restart_backoff: float = field(default=30.0, metadata={"help": "longest wait, in seconds, before restarting a worker that keeps dying (the first crash restarts at once, then 0.5 s doubling for crashes within a minute, up to this)"})
    drain_timeout: float = field(default=60.0, metadata={"help": "seconds a sleep in WAIT mode lets running requests finish before it aborts what is left"})
    stream_backlog: int = field(default=1024, metadata={"help": "tokens a stream may hold for a client that does not read them (beyond what the connection buffers); one more cancels the request (RESOURCE_EXHAUSTED), so a stalled client holds up no sleep"})
    sample_interval: float = field(default=1.0, metadata={"help": "seconds between memory samples"})
    history: int = field(default=3600, metadata={"help": "memory samples kept for Status(include_history)"})
    http: str = field(default="", metadata={"help": "serve the OpenAI-compatible HTTP face on [HOST:]PORT (127.0.0.1 unless a host is given); off when empty"})
    control_token: str = field(default="", metadata={"help": "require 'authorization: Bearer TOKEN' for Sleep/WakeUp (gRPC) and /sleep, /wake_up (HTTP)"})
    served_name: str = field(default="", metadata={"help": "the name requests use for the model (OpenAI `model`); default: --model"})
    seed: int = field(default=0, metadata={"help": "seed of synthetic:<preset> weights (two synthetic models of one preset differ by their seed)"})
    replicas: int = field(default=1, metadata={"help": "workers serving the model, one per device of --devices (or all on --device): requests go to the least loaded awake one; a sleeping one wakes when every awake one has --scale-out-at requests"})
    devices: str = field(default="", metadata={"help": "comma-separated devices of the replicas (cuda:0,cuda:1); sets --replicas to their number"})
    scale_out_at: int = field(default=0, metadata={"help": "requests in flight on every awake replica before a sleeping one is woken (0: --max-batch)"})
    max_awake: int = field(default=0, metadata={"help": "with several models (--model A --model B): at most this many awake at once; waking another first puts the least recently used to sleep (0: as many as device memory holds)"})
    # Several models: each entry {"model": name, and any of PER_MODEL}; `model` is the first. From repeated --model
    # flags or the TOML file's [[models]] tables (not a flag of its own).
    models: tuple = field(default=(), metadata={"help": "", "flag": False})

    def __post_init__(self) -> None:
        self._check_models()
        self._check_replicas()
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            raise ValueError(f"device {device!r} is not one of {DEVICES_HELP}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, bfloat16, float16, float32")
        if self.sleep_level not in (1, 2, 3):
            raise ValueError(f"sleep_level must be 1, 2 or 3, got {self.sleep_level!r}")
        if self.idle_timeout < 0:
            raise ValueError("idle_timeout must be >= 0 (0 disables auto-sleep)")
        if self.keep_layers < 0:
            raise ValueError("keep_layers must be >= 0")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.vmm not in ("auto", "on", "off"):
            raise ValueError("vmm must be auto, on or off")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError("cuda_graphs must be auto, on or off")
        if self.fused_kernels not in ("auto", "on", "off"):
            raise ValueError("fused_kernels must be auto, on or off")
        if self.pool_format not in POOL_FORMATS:
            raise ValueError(f"pool_format must be one of {', '.join(POOL_FORMATS)}")
        parse_kv_cache(self.kv_cache)
        for name in INT_RANGES:
            check_int(name, getattr(self, name))
        if self.grace <= 0 or self.sample_interval <= 0 or self.history < 1:
            raise ValueError("grace and sample_interval must be > 0 and history >= 1")
        if isinstance(self.stream_backlog, bool) or not isinstance(self.stream_backlog, int) or self.stream_backlog < 1:
            raise ValueError(f"stream_backlog must be an integer >= 1, got {self.stream_backlog!r}")
        if self.worker_timeout <= 0 or self.drain_timeout < 0 or self.restart_backoff < 0:
            raise ValueError("worker_timeout must be > 0, drain_timeout and restart_backoff >= 0")
        if self.http:
            _ = self.http_address  # raises ValueError for a malformed [HOST:]PORT
        if not self.listen.startswith("unix:") and not self.listen.startswith("/"):
            host, _, port = self.listen.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"listen {self.listen!r} is neither unix:/path nor HOST:PORT")

    def _check_replicas(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or not 1 <= self.replicas <= 64:
            raise ValueError(f"replicas must be an integer in [1, 64], got {self.replicas!r}")
        if isinstance(self.scale_out_at, bool) or not isinstance(self.scale_out_at, int) or self.scale_out_at < 0:
            raise ValueError(f"scale_out_at must be an integer >= 0, got {self.scale_out_at!r}")
        if self.devices:
            devices = [d.strip() for d in self.devices.split(",")]
            if any(not d for d in devices) or len(set(devices)) != len(devices):
                raise ValueError(f"devices {self.devices!r} must name distinct devices, comma-separated")
            if self.replicas not in (1, len(devices)):
                raise ValueError(f"replicas={self.replicas} disagrees with the {len(devices)} devices given")
            self.replicas = len(devices)

    def _check_models(self) -> None:
        if isinstance(self.max_awake, bool) or not isinstance(self.max_awake, int) or self.max_awake < 0:
            raise ValueError(f"max_awake must be an integer >= 0, got {self.max_awake!r}")
        self.models = tuple(dict(m) for m in self.models)
        models = [m.get("model") for m in self.models]
        if any(not isinstance(n, str) or not n for n in models):
            raise ValueError("every [[models]] table needs a model name (model = \"...\")")
        names = [m.get("served_name") or m["model"] for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"a model is named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        for spec in self.models:
            other = set(spec) - PER_MODEL - {"model"}
            if other:
                raise ValueError(f"{', '.join(sorted(other))} cannot be set per model (per model: {', '.join(sorted(PER_MODEL))})")
        if self.models:
            self.model = models[0]

    @property
    def name(self) -> str:
        """What requests call this model."""
        return self.served_name or self.model

    @property
    def replica_devices(self) -> list[str]:
        """The device of each replica."""
        if self.devices:
            return [d.strip() for d in self.devices.split(",")]
        return [self.device] * self.replicas

    def model_configs(self) -> list[DaemonConfig]:
        """One configuration per worker: per model served (the first one the default), per replica of it."""
        models = [replace(self, models=(), **spec) for spec in self.models] if self.models else [self]
        return [replace(m, device=device, devices="", replicas=1) if len(m.replica_devices) > 1 else m
                for m in models for device in m.replica_devices]

    @classmethod
    def load(cls, flags: dict, environ: dict | None = None, toml_path: str | None = None) -> DaemonConfig:
        """Merge flags (None = not given), KSLEEP_* variables and the TOML file."""
        environ = os.environ if environ is None else environ
        toml_path = toml_path or environ.get("KSLEEP_CONFIG")
        table = tomllib.loads(Path(toml_path).read_text()) if toml_path else {}
        known = {f.name: f for f in fields(cls)}
        unknown = set(table) - set(known)
        if unknown:
            raise ValueError(f"unknown key(s) in {toml_path}: {', '.join(sorted(unknown))}")
        values = {}
        for name, f in known.items():
            if flags.get(name) is not None:
                values[name] = flags[name]
            elif f"KSLEEP_{name.upper()}" in environ and f.metadata.get("flag", True):
                values[name] = _parse(f, environ[f"KSLEEP_{name.upper()}"], f"KSLEEP_{name.upper()}")
            elif name in table:
                values[name] = table[name]
        if isinstance(flags.get("model"), list):  # --model A --model B: several models, the first the default
            given = flags["model"]
            values["model"] = given[0]
            if len(given) > 1:
                values["models"] = tuple({"model": m} for m in given)
        elif "models" in values and not isinstance(values["models"], (list, tuple)):
            raise ValueError("models must be an array of tables ([[models]])")
        return cls(**values)

    @property
    def http_address(self) -> tuple[str, int]:
        host, _, port = self.http.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"http {self.http!r} is not [HOST:]PORT")
        return host or "127.0.0.1", int(port)

    @property
    def unix_socket(self) -> Path | None:
        if self.listen.startswith("unix:"):
            return Path(self.listen[5:])
        return Path(self.listen) if self.listen.startswith("/") else None

    def worker_settings(self, socket_path: Path, start_asleep: bool, standby: bool = False,
                        weights=None) -> forkserver_pb2.WorkerSettings:
        """`weights` (a WeightsVersion): what an UpdateWeights left the model on, loaded instead of --model."""
        updated = weights is not None and weights.number > 0
        return forkserver_pb2.WorkerSettings(
            model=weights.source if updated else self.model, weights_version=weights.number if updated else 0, device=self.device, dtype=self.dtype, keep_layers=self.keep_layers,
            cache_dir=self.cache_dir, model_dir=self.model_dir, shm_dir=self.shm_dir, pool_prefix=self.pool_prefix,
            vmm=self.vmm, trust_remote_code=self.trust_remote_code, socket_path=str(socket_path),
            supervisor_pid=os.getpid(), start_asleep=start_asleep, log_level=self.log_level,
            cuda_graphs=self.cuda_graphs, kv_cache=self.kv_cache, max_batch=self.max_batch,
            fused_kernels=self.fused_kernels, pool_format=self.pool_format, seed=self.seed,
            max_queue=self.max_queue, prefill_chunk=self.prefill_chunk, standby=standby,
            skip_wake_checksums=not self.verify_wakes)


def _parse(f, text: str, where: str):
    kind = f.type if isinstance(f.type, type) else {"str": str, "float": float, "int": int, "bool": bool}[f.type]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{where}={text!r} is not a boolean")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{where}={text!r} is not a valid {kind.__name__}") from None
