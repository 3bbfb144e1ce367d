"""One place that turns exceptions into gRPC status codes, for the worker's and the supervisor's servers.

KsleepError subclasses name their own status (only ValidationError is INVALID_ARGUMENT: a ValueError from
deep inside is a bug, INTERNAL); a few standard exceptions map by kind; an error that came from
another gRPC server (the worker, seen by the supervisor) keeps its code and message. Anything else is INTERNAL,
with its message, and is logged with its traceback.
"""
from __future__ import annotations

import asyncio
import inspect
import logging

import grpc
from google.protobuf import unknown_fields

from .errors import KsleepError, ValidationError

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() == grpc.StatusCode.DATA_LOSS:  # the worker's pool failed a checksum: ours to repair, not lost
            return grpc.StatusCode.UNAVAILABLE, f"the worker's weight pool failed its checksum ({exc.details()}); " \
                                                "it is rebuilt from the model's files: retry"
        return exc.code(), exc.details() or str(exc.code())
    if isinstance(exc, KsleepError):  # ValidationError (the client's fault) is INVALID_ARGUMENT; other ValueErrors are bugs
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "out of memory"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "timed out"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str, on_error) -> None:
    code, message = status_for(exc)
    if on_error is not None:
        on_error(code.name)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


class _Undecodable:
    """What a request that does not parse becomes, so that it is refused with INVALID_ARGUMENT (grpc itself
    would answer INTERNAL) once it reaches the handler."""

    def __init__(self, message: str):
        self.message = message


def _unknown_fields(message) -> bool:
    if len(unknown_fields.UnknownFieldSet(message)):
        return True
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            values = value if field.is_repeated else [value]
            if any(not hasattr(v, "items") and _unknown_fields(v) for v in values):
                return True
    return False


def _strict(deserializer):
    def parse(data: bytes):
        try:
            message = deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError: bad UTF-8, truncated or malformed bytes
            return _Undecodable(f"the request does not parse: {exc}")
        if _unknown_fields(message):
            return _Undecodable("the request has fields this server does not know (client newer than the server?)")
        return message

    return parse


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, on_error=None):
        self.on_error = on_error  # called with the status code name of every error (metrics)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        method = details.method
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await _abort(context, ValidationError(request.message), method, self.on_error)
                try:
                    return await inner(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - every error leaves as a status
                    await _abort(context, exc, method, self.on_error)

            return grpc.unary_unary_rpc_method_handler(unary, _strict(handler.request_deserializer),
                                                       handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await _abort(context, ValidationError(request.message), method, self.on_error)
                try:
                    responses = inner_stream(request, context)
                    if inspect.isawaitable(responses):  # a handler that writes with context.write (health Watch)
                        await responses
                        return
                    async for response in responses:
                        yield response
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method, self.on_error)

            return grpc.unary_stream_rpc_method_handler(stream, _strict(handler.request_deserializer),
                                                        handler.response_serializer)
        return handler
