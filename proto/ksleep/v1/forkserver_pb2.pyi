from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerSettings(_message.Message):
    __slots__ = ("model", "device", "dtype", "keep_layers", "cache_dir", "model_dir", "shm_dir", "pool_prefix", "vmm", "trust_remote_code", "socket_path", "supervisor_pid", "start_asleep", "log_level", "cuda_graphs", "standby", "skip_wake_checksums", "kv_cache", "max_batch", "max_queue", "prefill_chunk", "fused_kernels", "pool_format", "seed", "weights_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CACHE_DIR_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    POOL_PREFIX_FIELD_NUMBER: _ClassVar[int]
    VMM_FIELD_NUMBER: _ClassVar[int]
    TRUST_REMOTE_CODE_FIELD_NUMBER: _ClassVar[int]
    SOCKET_PATH_FIELD_NUMBER: _ClassVar[int]
    SUPERVISOR_PID_FIELD_NUMBER: _ClassVar[int]
    START_ASLEEP_FIELD_NUMBER: _ClassVar[int]
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    SKIP_WAKE_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    FUSED_KERNELS_FIELD_NUMBER: _ClassVar[int]
    POOL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    dtype: str
    keep_layers: int
    cache_dir: str
    model_dir: str
    shm_dir: str
    pool_prefix: str
    vmm: str
    trust_remote_code: bool
    socket_path: str
    supervisor_pid: int
    start_asleep: bool
    log_level: str
    cuda_graphs: str
    standby: bool
    skip_wake_checksums: bool
    kv_cache: str
    max_batch: int
    max_queue: int
    prefill_chunk: int
    fused_kernels: str
    pool_format: str
    seed: int
    weights_version: int
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., keep_layers: _Optional[int] = ..., cache_dir: _Optional[str] = ..., model_dir: _Optional[str] = ..., shm_dir: _Optional[str] = ..., pool_prefix: _Optional[str] = ..., vmm: _Optional[str] = ..., trust_remote_code: _Optional[bool] = ..., socket_path: _Optional[str] = ..., supervisor_pid: _Optional[int] = ..., start_asleep: _Optional[bool] = ..., log_level: _Optional[str] = ..., cuda_graphs: _Optional[str] = ..., standby: _Optional[bool] = ..., skip_wake_checksums: _Optional[bool] = ..., kv_cache: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., prefill_chunk: _Optional[int] = ..., fused_kernels: _Optional[str] = ..., pool_format: _Optional[str] = ..., seed: _Optional[int] = ..., weights_version: _Optional[int] = ...) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("settings",)
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    settings: WorkerSettings
    def __init__(self, settings: _Optional[_Union[WorkerSettings, _Mapping]] = ...) -> None: ...

class ForkserverEvent(_message.Message):
    __slots__ = ("ready", "started", "exited", "rejected")
    class Ready(_message.Message):
        __slots__ = ("pid", "preload_seconds")
        PID_FIELD_NUMBER: _ClassVar[int]
        PRELOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
        pid: int
        preload_seconds: float
        def __init__(self, pid: _Optional[int] = ..., preload_seconds: _Optional[float] = ...) -> None: ...
    class Started(_message.Message):
        __slots__ = ("pid",)
        PID_FIELD_NUMBER: _ClassVar[int]
        pid: int
        def __init__(self, pid: _Optional[int] = ...) -> None: ...
    class Exited(_message.Message):
        __slots__ = ("pid", "returncode")
        PID_FIELD_NUMBER: _ClassVar[int]
        RETURNCODE_FIELD_NUMBER: _ClassVar[int]
        pid: int
        returncode: int
        def __init__(self, pid: _Optional[int] = ..., returncode: _Optional[int] = ...) -> None: ...
    class Rejected(_message.Message):
        __slots__ = ("error", "status")
        ERROR_FIELD_NUMBER: _ClassVar[int]
        STATUS_FIELD_NUMBER: _ClassVar[int]
        error: str
        status: str
        def __init__(self, error: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...
    READY_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ready: ForkserverEvent.Ready
    started: ForkserverEvent.Started
    exited: ForkserverEvent.Exited
    rejected: ForkserverEvent.Rejected
    def __init__(self, ready: _Optional[_Union[ForkserverEvent.Ready, _Mapping]] = ..., started: _Optional[_Union[ForkserverEvent.Started, _Mapping]] = ..., exited: _Optional[_Union[ForkserverEvent.Exited, _Mapping]] = ..., rejected: _Optional[_Union[ForkserverEvent.Rejected, _Mapping]] = ...) -> None: ...
