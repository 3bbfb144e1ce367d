"""ksleep's Python client: `Client` (blocking) and `AsyncClient` (asyncio) over ksleepd's gRPC API.

Errors are typed: InvalidArgument, FailedPrecondition, ResourceExhausted, Unavailable, Aborted,
Unauthenticated, DeadlineExceeded, ServerError, all KsleepClientError with `.code` and `.details`.
"""
from .client import AsyncClient, Client, build_request, resolve_address
from .errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KsleepClientError,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from .types import Completion, Status, Token
from .writer import WeightWriter

__all__ = [
    "Aborted", "AsyncClient", "Client", "Completion", "DeadlineExceeded", "FailedPrecondition", "InvalidArgument",
    "KsleepClientError", "PermissionDenied", "ResourceExhausted", "ServerError", "Status", "Token", "Unauthenticated", "Unavailable",
    "WeightWriter", "build_request", "resolve_address",
]
