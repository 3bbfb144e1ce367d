"""What the client returns: plain dataclasses built from the wire messages."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ksleep.v1 import common_pb2, ksleep_pb2
from ksleep.worker.names import finish_name, state_name


@dataclass(slots=True)
class Token:
    index: int
    id: int
    text: str
    finish_reason: str | None  # "length", "eos", "stop" on the last token
    server_elapsed: float  # the daemon's seconds from the request's arrival to this token

    @classmethod
    def from_pb(cls, pb: common_pb2.Token) -> Token:
        return cls(pb.index, pb.id, pb.text, finish_name(pb.finish_reason), pb.elapsed_seconds)


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    ttft_seconds: float  # measured here: request sent -> first token received
    total_seconds: float  # measured here: request sent -> last token received
    prompt_tokens: int = 0
    woke: bool = False  # the request waited for the model to wake
    weights_version: int = 0  # the weights that produced it (0: those the daemon started on; +1 per UpdateWeights)

    def to_dict(self) -> dict:
        return asdict(self)


def transition_dict(pb: common_pb2.Transition) -> dict:
    return {"seconds": pb.seconds, "bytes": pb.bytes, "level": pb.level, "at_unix": pb.at_unix,
            "source": pb.source, "phases": dict(pb.phases), "overlapped": pb.overlapped}


def batch_dict(pb) -> dict:
    """BatchStats as plain values: repeated fields become lists, so the dict is JSON as it stands."""
    return {f.name: list(getattr(pb, f.name)) if f.is_repeated else getattr(pb, f.name)
            for f in pb.DESCRIPTOR.fields}


@dataclass(slots=True)
class Status:
    """The daemon's Status, with states as words ("awake") and transitions as dicts."""

    state: str
    sleep_level: int
    model: str
    device: str
    weight_bytes: int
    device_used_bytes: int
    device_total_bytes: int
    worker_device_bytes: int | None
    pool_bytes: int
    worker_pid: int
    restarts: int
    in_flight: int
    idle_seconds: float
    idle_timeout_seconds: float
    last_sleep: dict | None
    last_wake: dict | None
    last_restart: dict | None
    last_ttft_seconds: float | None
    sleeps_total: int
    wakes_total: int
    memory_source: str
    worker_load_source: str
    uptime_seconds: float
    configured_sleep_level: int
    version: str
    standby_pid: int = 0  # the spare worker (ksleepd --standby); 0 when none is ready
    history: list[dict] = field(default_factory=list)
    batch: dict | None = None  # the worker's batch and KV cache (running, waiting, kv_cache_bytes...; see BatchStats)
    weights: dict = field(default_factory=dict)  # {"number": updates so far, "source": model or checkpoint directory}
    models: list = field(default_factory=list)  # with several models: each one's Status (the first the default)
    model_switches: int = 0  # models put to sleep to make room for another
    scale_outs: int = 0  # sleeping replicas woken because every awake one was busy
    pool_format: str = ""  # "raw" or "compressed"

    @classmethod
    def from_pb(cls, pb: ksleep_pb2.StatusResponse) -> Status:
        def optional(name):
            return getattr(pb, name) if pb.HasField(name) else None

        history = [{"at_unix": s.at_unix, "state": state_name(s.state), "device_used_bytes": s.device_used_bytes,
                    "worker_device_bytes": s.worker_device_bytes if s.HasField("worker_device_bytes") else None,
                    "pool_bytes": s.pool_bytes} for s in pb.history]
        return cls(
            state_name(pb.state), pb.sleep_level, pb.model, pb.device, pb.weight_bytes, pb.device_used_bytes,
            pb.device_total_bytes, optional("worker_device_bytes"), pb.pool_bytes, pb.worker_pid, pb.restarts,
            pb.in_flight, pb.idle_seconds, pb.idle_timeout_seconds,
            *(transition_dict(getattr(pb, n)) if pb.HasField(n) else None for n in ("last_sleep", "last_wake", "last_restart")),
            optional("last_ttft_seconds"), pb.sleeps_total, pb.wakes_total, pb.memory_source, pb.worker_load_source,
            pb.uptime_seconds, pb.configured_sleep_level, pb.version, pb.standby_pid, history,
            batch_dict(pb.batch) if pb.HasField("batch") else None,
            {"number": pb.weights.number, "source": pb.weights.source},
            [cls.from_pb(m) for m in pb.models], pb.model_switches, pb.scale_outs, pb.pool_format,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def update_dict(pb) -> dict:
    """An UpdateWeightsResponse as plain values."""
    return {"weights_version": pb.weights.number, "source": pb.weights.source, "seconds": pb.seconds,
            "stage_seconds": pb.stage_seconds, "swap_seconds": pb.swap_seconds, "pool": pb.pool,
            "aborted_requests": pb.aborted_requests}
