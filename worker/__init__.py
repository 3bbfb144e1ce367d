"""ksleep's GPU worker core: one weight arena, a write-once pinned shared-memory pool, sleep and wake.

Public surface:
    Engine.load(WorkerConfig(...)) -> Engine      generate / complete / sleep / wake / memory / close
    SamplingParams, TokenEvent, Completion        generation inputs and outputs
    errors                                        exceptions, each tagged with its wire status
"""
from .config import WorkerConfig
from .engine import Engine, EngineState
from .reports import LoadReport, SleepResult, WakeResult
from .errors import (
    AsleepError,
    BusyError,
    DeviceMemoryError,
    KsleepError,
    ModelNotFoundError,
    PoolCapacityError,
    PoolCorruptError,
    UnsupportedModelError,
)
from .generation import Completion, SamplingParams, TokenEvent
from .memory import MemoryReport

__all__ = [
    "AsleepError", "BusyError", "Completion", "DeviceMemoryError", "Engine", "EngineState", "KsleepError",
    "LoadReport", "MemoryReport", "ModelNotFoundError", "PoolCapacityError", "PoolCorruptError", "SamplingParams",
    "SleepResult", "TokenEvent", "UnsupportedModelError", "WakeResult", "WorkerConfig",
]
