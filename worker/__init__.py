"""ksleep's GPU worker core: one weight arena, a write-once pinned shared-memory pool, sleep and wake.

Public surface:
    Engine.load(WorkerConfig(...)) -> Engine      generate / complete / sleep / wake / memory / close
    SamplingParams, TokenEvent, Completion        generation inputs and outputs
    errors                                        exceptions, each tagged with its wire status

Names are imported on first use, so that `ksleep.worker.errors` (which the supervisor needs) does not pull in
torch.
"""
import importlib

_EXPORTS = {
    "WorkerConfig": ".config", "Engine": ".engine", "EngineState": ".engine",
    "LoadReport": ".reports", "SleepResult": ".reports", "WakeResult": ".reports",
    "Completion": ".generation", "SamplingParams": ".generation", "TokenEvent": ".generation",
    "MemoryReport": ".memory",
    **{name: ".errors" for name in ("AsleepError", "BusyError", "DeviceMemoryError", "KsleepError",
                                    "ModelNotFoundError", "PoolCapacityError", "PoolCorruptError",
                                    "UnsupportedModelError")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
