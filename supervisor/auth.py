"""The control token: Sleep, WakeUp and UpdateWeights (gRPC) and /sleep, /wake_up, /update_weights_from_disk
(HTTP) are privileged when it is set.

Generate, Status and health stay open. Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac

import grpc

PROTECTED_METHODS = frozenset({"/ksleep.v1.Ksleep/Sleep", "/ksleep.v1.Ksleep/WakeUp", "/ksleep.v1.Ksleep/UpdateWeights"})


def authorized(token: str, header: str | None) -> bool:
    """Whether an `authorization` value carries `token` (always, when no token is configured)."""
    if not token:
        return True
    return bool(header) and hmac.compare_digest(header.encode(), f"Bearer {token}".encode())


class ControlTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        if not self.token or details.method not in PROTECTED_METHODS:
            return await continuation(details)
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if authorized(self.token, header):
            return await continuation(details)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this control verb needs metadata 'authorization: Bearer <control token>'")

        return grpc.unary_unary_rpc_method_handler(refuse)
