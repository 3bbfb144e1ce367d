"""Errors the worker raises, each tagged with the status it maps to on the wire.

The gRPC and HTTP layers read `status` instead of keeping their own table of exception types, so a new
error only has to name its status here.
"""
from __future__ import annotations


class KsleepError(Exception):
    """Base class; `status` is a gRPC status code name."""

    status = "INTERNAL"


class ValidationError(KsleepError, ValueError):
    """The request itself is wrong (a parameter, the prompt's shape or size, a limit): the client's fault. Only
    this type becomes INVALID_ARGUMENT; any other ValueError from inside is a bug and INTERNAL."""

    status = "INVALID_ARGUMENT"


class ModelNotFoundError(KsleepError, ValueError):
    """The model name resolves to nothing we can load."""

    status = "INVALID_ARGUMENT"


class UnsupportedModelError(KsleepError, ValueError):
    """The model exists but its architecture or dtype is not one we serve."""

    status = "INVALID_ARGUMENT"


class PoolCapacityError(KsleepError, MemoryError):
    """/dev/shm or host RAM cannot hold the weight pool."""

    status = "RESOURCE_EXHAUSTED"


class DeviceMemoryError(KsleepError, MemoryError):
    """The device has no room for the arena (another process took it while we slept)."""

    status = "RESOURCE_EXHAUSTED"


class PoolCorruptError(KsleepError):
    """The shared-memory mirror does not match its manifest (checksum, size or layout)."""

    status = "DATA_LOSS"


class PoolOwnershipError(KsleepError, PermissionError):
    """The pool file belongs to another user or is readable by others: never attach to it."""

    status = "PERMISSION_DENIED"


class StateError(KsleepError):
    """The operation is not valid in the engine's current state."""

    status = "FAILED_PRECONDITION"


class AsleepError(StateError):
    """Generation was asked of a sleeping engine; wake it first."""


class BusyError(StateError):
    """Sleep was asked while generations are still streaming."""


class ClosedError(StateError):
    """The engine was closed."""


class QueueFullError(KsleepError):
    """The queue of requests waiting for the batch is at its limit (--max-queue)."""

    status = "RESOURCE_EXHAUSTED"


class SleepAbortError(KsleepError):
    """The request was cancelled because the model was put to sleep with abort."""

    status = "ABORTED"
