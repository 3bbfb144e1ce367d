from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    STATE_LOADING: _ClassVar[State]
    STATE_AWAKE: _ClassVar[State]
    STATE_SLEEPING: _ClassVar[State]
    STATE_ASLEEP: _ClassVar[State]
    STATE_WAKING: _ClassVar[State]
    STATE_STOPPED: _ClassVar[State]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_STOP: FinishReason
STATE_UNSPECIFIED: State
STATE_LOADING: State
STATE_AWAKE: State
STATE_SLEEPING: State
STATE_ASLEEP: State
STATE_WAKING: State
STATE_STOPPED: State

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids", "chat")
    class TokenIds(_message.Message):
        __slots__ = ("ids",)
        IDS_FIELD_NUMBER: _ClassVar[int]
        ids: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...
    class ChatMessage(_message.Message):
        __slots__ = ("role", "content")
        ROLE_FIELD_NUMBER: _ClassVar[int]
        CONTENT_FIELD_NUMBER: _ClassVar[int]
        role: str
        content: str
        def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...
    class Chat(_message.Message):
        __slots__ = ("messages",)
        MESSAGES_FIELD_NUMBER: _ClassVar[int]
        messages: _containers.RepeatedCompositeFieldContainer[Prompt.ChatMessage]
        def __init__(self, messages: _Optional[_Iterable[_Union[Prompt.ChatMessage, _Mapping]]] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: Prompt.TokenIds
    chat: Prompt.Chat
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[Prompt.TokenIds, _Mapping]] = ..., chat: _Optional[_Union[Prompt.Chat, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "min_tokens", "repetition_penalty", "stop_token_ids", "logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    min_tokens: int
    repetition_penalty: float
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., min_tokens: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("id", "text", "logprob")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    logprob: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("index", "id", "text", "finish_reason", "elapsed_seconds", "logprob", "top_logprobs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: int
    text: str
    finish_reason: FinishReason
    elapsed_seconds: float
    logprob: TokenLogprob
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, index: _Optional[int] = ..., id: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., elapsed_seconds: _Optional[float] = ..., logprob: _Optional[_Union[TokenLogprob, _Mapping]] = ..., top_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class Memory(_message.Message):
    __slots__ = ("arena_bytes", "weight_bytes", "resident_bytes", "cache_bytes", "device_used_bytes", "device_total_bytes", "process_device_bytes", "mirror_bytes", "rss_bytes")
    ARENA_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIRROR_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    arena_bytes: int
    weight_bytes: int
    resident_bytes: int
    cache_bytes: int
    device_used_bytes: int
    device_total_bytes: int
    process_device_bytes: int
    mirror_bytes: int
    rss_bytes: int
    def __init__(self, arena_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., device_used_bytes: _Optional[int] = ..., device_total_bytes: _Optional[int] = ..., process_device_bytes: _Optional[int] = ..., mirror_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("seconds", "bytes", "level", "at_unix", "source", "phases", "overlapped")
    class PhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPED_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    bytes: int
    level: int
    at_unix: float
    source: str
    phases: _containers.ScalarMap[str, float]
    overlapped: bool
    def __init__(self, seconds: _Optional[float] = ..., bytes: _Optional[int] = ..., level: _Optional[int] = ..., at_unix: _Optional[float] = ..., source: _Optional[str] = ..., phases: _Optional[_Mapping[str, float]] = ..., overlapped: _Optional[bool] = ...) -> None: ...

class BatchStats(_message.Message):
    __slots__ = ("running", "waiting", "kv_cache_bytes", "kv_cache_tokens", "kv_used_tokens", "max_batch", "max_queue", "steps", "generated_tokens", "attention", "cuda_graphs", "graphs_captured", "kv_mapped_bytes", "fused")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    GRAPHS_CAPTURED_FIELD_NUMBER: _ClassVar[int]
    KV_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_cache_bytes: int
    kv_cache_tokens: int
    kv_used_tokens: int
    max_batch: int
    max_queue: int
    steps: int
    generated_tokens: int
    attention: str
    cuda_graphs: bool
    graphs_captured: int
    kv_mapped_bytes: int
    fused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., kv_cache_tokens: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_queue: _Optional[int] = ..., steps: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., attention: _Optional[str] = ..., cuda_graphs: _Optional[bool] = ..., graphs_captured: _Optional[int] = ..., kv_mapped_bytes: _Optional[int] = ..., fused: _Optional[_Iterable[str]] = ...) -> None: ...

class WeightsVersion(_message.Message):
    __slots__ = ("number", "source")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    number: int
    source: str
    def __init__(self, number: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...
