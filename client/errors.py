"""gRPC status codes as Python exceptions, each carrying the server's message."""
from __future__ import annotations

import grpc


class KsleepClientError(Exception):
    """Base class. `code` is the gRPC status code, `details` the server's message."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgument(KsleepClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(KsleepClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(KsleepClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KsleepClientError):
    """The daemon, or its worker, cannot be reached right now."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(KsleepClientError):
    """The request was cancelled by a sleep with abort."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(KsleepClientError):
    """A control verb without the right control token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KsleepClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(KsleepClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerError(KsleepClientError):
    """Anything else the server reported (INTERNAL, DATA_LOSS, ...)."""


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, FailedPrecondition, ResourceExhausted, Unavailable, Aborted,
                                      Unauthenticated, PermissionDenied, DeadlineExceeded)}


def from_rpc_error(error: grpc.RpcError) -> KsleepClientError:
    code = error.code()
    return _BY_CODE.get(code, ServerError)(error.details() or code.name, code)
