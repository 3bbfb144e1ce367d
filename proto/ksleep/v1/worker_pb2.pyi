from ksleep.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("prompt", "params", "arrived_unix")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_UNIX_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    params: _common_pb2.SamplingParams
    arrived_unix: float
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., arrived_unix: _Optional[float] = ...) -> None: ...

class WorkerGenerateResponse(_message.Message):
    __slots__ = ("token", "prompt_tokens", "weights")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    token: _common_pb2.Token
    prompt_tokens: int
    weights: _common_pb2.WeightsVersion
    def __init__(self, token: _Optional[_Union[_common_pb2.Token, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., weights: _Optional[_Union[_common_pb2.WeightsVersion, _Mapping]] = ...) -> None: ...

class WorkerSleepRequest(_message.Message):
    __slots__ = ("level",)
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    level: int
    def __init__(self, level: _Optional[int] = ...) -> None: ...

class WorkerSleepResponse(_message.Message):
    __slots__ = ("sleep",)
    SLEEP_FIELD_NUMBER: _ClassVar[int]
    sleep: _common_pb2.Transition
    def __init__(self, sleep: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ...) -> None: ...

class WorkerWakeRequest(_message.Message):
    __slots__ = ("overlap", "waiting_requests")
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    overlap: bool
    waiting_requests: int
    def __init__(self, overlap: _Optional[bool] = ..., waiting_requests: _Optional[int] = ...) -> None: ...

class WorkerWakeResponse(_message.Message):
    __slots__ = ("wake",)
    WAKE_FIELD_NUMBER: _ClassVar[int]
    wake: _common_pb2.Transition
    def __init__(self, wake: _Optional[_Union[_common_pb2.Transition, _Mapping]] = ...) -> None: ...

class WorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatusResponse(_message.Message):
    __slots__ = ("state", "sleep_level", "model", "device", "device_uuid", "memory", "pid", "pool_name", "load_source", "load_seconds", "load_phases", "stable_addresses", "in_flight", "context_tokens", "batch", "weights", "pool_format")
    class LoadPhasesEntry(_message.Message):
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
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    POOL_NAME_FIELD_NUMBER: _ClassVar[int]
    LOAD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_PHASES_FIELD_NUMBER: _ClassVar[int]
    STABLE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    POOL_FORMAT_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.State
    sleep_level: int
    model: str
    device: str
    device_uuid: str
    memory: _common_pb2.Memory
    pid: int
    pool_name: str
    load_source: str
    load_seconds: float
    load_phases: _containers.ScalarMap[str, float]
    stable_addresses: bool
    in_flight: int
    context_tokens: int
    batch: _common_pb2.BatchStats
    weights: _common_pb2.WeightsVersion
    pool_format: str
    def __init__(self, state: _Optional[_Union[_common_pb2.State, str]] = ..., sleep_level: _Optional[int] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., device_uuid: _Optional[str] = ..., memory: _Optional[_Union[_common_pb2.Memory, _Mapping]] = ..., pid: _Optional[int] = ..., pool_name: _Optional[str] = ..., load_source: _Optional[str] = ..., load_seconds: _Optional[float] = ..., load_phases: _Optional[_Mapping[str, float]] = ..., stable_addresses: _Optional[bool] = ..., in_flight: _Optional[int] = ..., context_tokens: _Optional[int] = ..., batch: _Optional[_Union[_common_pb2.BatchStats, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.WeightsVersion, _Mapping]] = ..., pool_format: _Optional[str] = ...) -> None: ...

class WorkerUpdateWeightsRequest(_message.Message):
    __slots__ = ("directory", "abort")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    directory: str
    abort: bool
    def __init__(self, directory: _Optional[str] = ..., abort: _Optional[bool] = ...) -> None: ...

class WorkerUpdateWeightsResponse(_message.Message):
    __slots__ = ("weights", "seconds", "stage_seconds", "swap_seconds", "pool")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SWAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    weights: _common_pb2.WeightsVersion
    seconds: float
    stage_seconds: float
    swap_seconds: float
    pool: str
    def __init__(self, weights: _Optional[_Union[_common_pb2.WeightsVersion, _Mapping]] = ..., seconds: _Optional[float] = ..., stage_seconds: _Optional[float] = ..., swap_seconds: _Optional[float] = ..., pool: _Optional[str] = ...) -> None: ...
