from ksleep.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SleepMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLEEP_MODE_UNSPECIFIED: _ClassVar[SleepMode]
    SLEEP_MODE_WAIT: _ClassVar[SleepMode]
    SLEEP_MODE_ABORT: _ClassVar[SleepMode]
SLEEP_MODE_UNSPECIFIED: SleepMode
SLEEP_MODE_WAIT: SleepMode
SLEEP_MODE_ABORT: SleepMode

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "params", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    params: _common_pb2.SamplingParams
    model: str
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateSummary(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "ttft_seconds", "total_seconds", "woke", "weights")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WOKE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    ttft_seconds: float
    total_seconds: float
    woke: bool
    weights: _common_pb2.WeightsVersion
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., woke: _Optional[bool] = ..., weights: _Optional[_Union[_common_pb2.WeightsVersion, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "summary")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token: _common_pb2.Token
    summary: GenerateSummary
    def __init__(self, token: _Optional[_Union[_common_pb2.Token, _Mapping]] = ..., summary: _Optional[_Union[GenerateSummary, _Mapping]] = ...) -> None: ...

class SleepRequest(_message.Message):
    __slots__ = ("level", "mode", "model")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    level: int
    mode: SleepMode
    model: str
    def __init__(self, level: _Optional[int] = ..., mode: _Optional[_Union[SleepMode, str]] = ..., model: _Optional[str] = ...) -> None: ...

class SleepResponse(_message.Message):
    __slots__ = ("sleep", "aborted_requests")
    SLEEP_FIELD_NUMBER: _ClassVar[int]
    ABORTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    sleep: _common_pb2.Transition
    aborted_requests: int
    def __init__(self, sleep: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ..., aborted_requests: _Optional[int] = ...) -> None: ...

class WakeUpRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WakeUpResponse(_message.Message):
    __slots__ = ("wake",)
    WAKE_FIELD_NUMBER: _ClassVar[int]
    wake: _common_pb2.Transition
    def __init__(self, wake: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("include_history", "model")
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    include_history: bool
    model: str
    def __init__(self, include_history: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class MemorySample(_message.Message):
    __slots__ = ("at_unix", "state", "device_used_bytes", "worker_device_bytes", "pool_bytes")
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    at_unix: float
    state: _common_pb2.State
    device_used_bytes: int
    worker_device_bytes: int
    pool_bytes: int
    def __init__(self, at_unix: _Optional[float] = ..., state: _Optional[_Union[_common_pb2.State, str]] = ..., device_used_bytes: _Optional[int] = ..., worker_device_bytes: _Optional[int] = ..., pool_bytes: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("state", "sleep_level", "model", "device", "weight_bytes", "device_used_bytes", "device_total_bytes", "worker_device_bytes", "pool_bytes", "worker_pid", "restarts", "in_flight", "idle_seconds", "idle_timeout_seconds", "last_sleep", "last_wake", "last_ttft_seconds", "sleeps_total", "wakes_total", "memory_source", "worker_load_source", "uptime_seconds", "configured_sleep_level", "version", "history", "last_restart", "worker_load_seconds", "worker_load_phases", "standby_pid", "batch", "weights", "models", "model_switches", "scale_outs", "pool_format")
    class WorkerLoadPhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    SLEEP_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SLEEP_FIELD_NUMBER: _ClassVar[int]
    LAST_WAKE_FIELD_NUMBER: _ClassVar[int]
    LAST_TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SLEEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WAKES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    WORKER_LOAD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_SLEEP_LEVEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    LAST_RESTART_FIELD_NUMBER: _ClassVar[int]
    WORKER_LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_LOAD_PHASES_FIELD_NUMBER: _ClassVar[int]
    STANDBY_PID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MODEL_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    SCALE_OUTS_FIELD_NUMBER: _ClassVar[int]
    POOL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.State
    sleep_level: int
    model: str
    device: str
    weight_bytes: int
    device_used_bytes: int
    device_total_bytes: int
    worker_device_bytes: int
    pool_bytes: int
    worker_pid: int
    restarts: int
    in_flight: int
    idle_seconds: float
    idle_timeout_seconds: float
    last_sleep: _common_pb2.Transition
    last_wake: _common_pb2.Transition
    last_ttft_seconds: float
    sleeps_total: int
    wakes_total: int
    memory_source: str
    worker_load_source: str
    uptime_seconds: float
    configured_sleep_level: int
    version: str
    history: _containers.RepeatedCompositeFieldContainer[MemorySample]
    last_restart: _common_pb2.Transition
    worker_load_seconds: float
    worker_load_phases: _containers.ScalarMap[str, float]
    standby_pid: int
    batch: _common_pb2.BatchStats
    weights: _common_pb2.WeightsVersion
    models: _containers.RepeatedCompositeFieldContainer[StatusResponse]
    model_switches: int
    scale_outs: int
    pool_format: str
    def __init__(self, state: _Optional[_Union[_common_pb2.State, str]] = ..., sleep_level: _Optional[int] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., device_used_bytes: _Optional[int] = ..., device_total_bytes: _Optional[int] = ..., worker_device_bytes: _Optional[int] = ..., pool_bytes: _Optional[int] = ..., worker_pid: _Optional[int] = ..., restarts: _Optional[int] = ..., in_flight: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., idle_timeout_seconds: _Optional[float] = ..., last_sleep: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ..., last_wake: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ..., last_ttft_seconds: _Optional[float] = ..., sleeps_total: _Optional[int] = ..., wakes_total: _Optional[int] = ..., memory_source: _Optional[str] = ..., worker_load_source: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., configured_sleep_level: _Optional[int] = ..., version: _Optional[str] = ..., history: _Optional[_Iterable[_Union[MemorySample, _Mapping]]] = ..., last_restart: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ..., worker_load_seconds: _Optional[float] = ..., worker_load_phases: _Optional[_Mapping[str, float]] = ..., standby_pid: _Optional[int] = ..., batch: _Optional[_Union[_common_pb2.BatchStats, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.WeightsVersion, _Mapping]] = ..., models: _Optional[_Iterable[_Union[StatusResponse, _Mapping]]] = ..., model_switches: _Optional[int] = ..., scale_outs: _Optional[int] = ..., pool_format: _Optional[str] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("directory", "mode", "model")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    directory: str
    mode: SleepMode
    model: str
    def __init__(self, directory: _Optional[str] = ..., mode: _Optional[_Union[SleepMode, str]] = ..., model: _Optional[str] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("weights", "seconds", "stage_seconds", "swap_seconds", "pool", "aborted_requests")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ABORTED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    weights: _common_pb2.WeightsVersion
    seconds: float
    stage_seconds: float
    swap_seconds: float
    pool: str
    aborted_requests: int
    def __init__(self, weights: _Optional[_Union[_common_pb2.WeightsVersion, _Mapping]] = ..., seconds: _Optional[float] = ..., stage_seconds: _Optional[float] = ..., swap_seconds: _Optional[float] = ..., pool: _Optional[str] = ..., aborted_requests: _Optional[int] = ...) -> None: ...
