"""The HTTP face of ksleepd (`--http HOST:PORT`): OpenAI-compatible completions and chat, vLLM-compatible sleep
control, health and Prometheus metrics. It calls the same KsleepService as the gRPC API, in-process.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from ksleep.v1 import ksleep_pb2
from ksleep.worker.interceptor import status_for
from ksleep.worker.names import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, finish_name, state_name

from .auth import authorized
from .config import DaemonConfig
from .openai_api import ChatRequest, CompletionRequest, UpdateWeightsRequest
from .server import KsleepService

log = logging.getLogger("ksleep.http")
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404, "UNAUTHENTICATED": 401,
               "PERMISSION_DENIED": 403, "FAILED_PRECONDITION": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 503,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501}
MAX_BODY = 16 << 20  # bytes, as the gRPC face's message limit
OPENAI_FINISH = {FINISH_LENGTH: "length", FINISH_EOS: "stop", FINISH_STOP: "stop"}  # OpenAI's names for ours


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error object."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status,
                        headers=headers)


TOO_LARGE = f"request body over {MAX_BODY:,} bytes"
CLOSE = {"Connection": "close"}  # the rest of a refused body is never read, so the connection cannot serve another


class _BodyLimit:
    """Refuses request bodies over MAX_BODY with a 413 while they stream: a chunked body has no Content-Length to
    check, so what arrives is counted and reading stops as soon as it passes the limit."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:  # before the endpoint runs or a byte of the body is read
            self.metrics.error("INVALID_ARGUMENT")
            return await error_response(413, TOO_LARGE, headers=CLOSE)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:  # FastAPI passes an HTTPException met while reading the body on to http_error
                raise StarletteHTTPException(413, TOO_LARGE, CLOSE)
            return message

        await self.app(scope, counted, send)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # ksleepd owns SIGTERM/SIGINT; uvicorn must not take them
        yield


class HttpFace:
    def __init__(self, config: DaemonConfig, service: KsleepService):
        self.config, self.service = config, service
        self.app = build_app(config, service)
        host, port = config.http_address
        self._server = _Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off",
                                              access_log=False))
        self._task = None

    async def start(self) -> None:
        import asyncio

        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the bind error
                raise OSError(f"the HTTP face could not start on {self.config.http}")
            await asyncio.sleep(0.01)  # uvicorn offers no "started" event
        log.info("HTTP face on http://%s:%d", *self.config.http_address)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def build_app(config: DaemonConfig, service: KsleepService) -> FastAPI:
    app = FastAPI(title="ksleepd", version="1", description="OpenAI-compatible face of ksleepd")
    models, metrics = service.models, service.metrics

    def failed(exc: Exception) -> JSONResponse:
        code, message = status_for(exc)
        metrics.error(code.name)
        status = HTTP_STATUS.get(code.name, 500)
        kind = "invalid_request_error" if status < 500 else "server_error"
        return error_response(status, message, kind, code.name.lower())

    app.add_middleware(_BodyLimit, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Errors raised by the framework itself (unparsable body, unknown path, wrong method): same shape."""
        if exc.status_code in (400, 413):
            metrics.error("INVALID_ARGUMENT")
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("INVALID_ARGUMENT")
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request"))

    async def first_and_rest(request_pb: ksleep_pb2.GenerateRequest):
        """Start the generation; errors before the first token become an HTTP error, not a broken stream."""
        stream = service.Generate(request_pb, None)
        first = await stream.__anext__()
        return first, stream

    def unknown_model(name: str | None) -> JSONResponse | None:
        if name and name not in models.lifecycles:
            return error_response(404, f"The model `{name}` does not exist; this server serves "
                                       f"{', '.join(f'`{m}`' for m in models.lifecycles)}", code="model_not_found")
        return None

    async def run(body, chat: bool):
        if (wrong := unknown_model(body.model)) is not None:
            return wrong
        model_name = body.model or models.default.config.name
        starts = []
        try:
            requests = body.choice_requests()
            for request_pb in requests:
                request_pb.model = model_name
            # every choice started before any first token is awaited: they join the batch together
            starts = [asyncio.ensure_future(first_and_rest(r)) for r in requests]
            streams = [await s for s in starts]
        except Exception as exc:  # noqa: BLE001 - reported as an HTTP error
            for s in starts:
                s.cancel()
                if s.done() and not s.cancelled() and s.exception() is None:
                    await s.result()[1].aclose()
            return failed(exc)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_sse(streams, chat, ident, created, model_name, body.include_usage, failed),
                                     media_type="text/event-stream")

        async def drain(first, rest):
            tokens = [first.token]
            last = first
            async for message in rest:
                tokens.append(message.token)
                last = message
            return tokens, last

        try:
            results = await asyncio.gather(*(drain(first, rest) for first, rest in streams))
        except Exception as exc:  # noqa: BLE001
            return failed(exc)
        choices = []
        for i, (tokens, last) in enumerate(results):
            text, finish = "".join(t.text for t in tokens), OPENAI_FINISH.get(finish_name(last.token.finish_reason))
            logprobs = _logprobs(tokens, chat)
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": finish} if chat
                           else {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices, "usage": _usage([last for _, last in results])}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await run(body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        return await run(body, chat=True)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(lc.started_unix), "owned_by": "ksleep",
             "state": state_name(lc.state), "sleep_level": lc.sleep_level} for name, lc in models.lifecycles.items()]}

    def control(request: Request) -> JSONResponse | None:
        if not authorized(config.control_token, request.headers.get("authorization")):
            metrics.error("UNAUTHENTICATED")
            return error_response(401, "this control endpoint needs 'Authorization: Bearer <control token>'",
                                  "authentication_error", "unauthenticated")
        return None

    @app.post("/sleep")
    async def sleep(request: Request, level: int = Query(default=None, ge=1, le=3), mode: str = Query(default="wait", pattern="^(wait|abort)$"),
                    model: str = Query(default="", max_length=4096)):
        if (refused := control(request) or unknown_model(model)) is not None:
            return refused
        try:
            reply = await service.Sleep(ksleep_pb2.SleepRequest(
                mode=ksleep_pb2.SLEEP_MODE_ABORT if mode == "abort" else ksleep_pb2.SLEEP_MODE_WAIT, model=model,
                **({"level": level} if level is not None else {})), None)
        except Exception as exc:  # noqa: BLE001
            return failed(exc)
        return {"level": reply.sleep.level, "seconds": reply.sleep.seconds, "bytes_freed": reply.sleep.bytes,
                "aborted_requests": reply.aborted_requests}

    @app.post("/wake_up")
    async def wake_up(request: Request, model: str = Query(default="", max_length=4096)):
        if (refused := control(request) or unknown_model(model)) is not None:
            return refused
        try:
            reply = await service.WakeUp(ksleep_pb2.WakeUpRequest(model=model), None)
        except Exception as exc:  # noqa: BLE001
            return failed(exc)
        return {"seconds": reply.wake.seconds, "bytes_restored": reply.wake.bytes, "source": reply.wake.source}

    @app.post("/update_weights_from_disk")
    async def update_weights(request: Request, body: UpdateWeightsRequest):
        if (refused := control(request) or unknown_model(body.model)) is not None:
            return refused
        mode = ksleep_pb2.SLEEP_MODE_ABORT if body.abort_all_requests else ksleep_pb2.SLEEP_MODE_WAIT
        try:
            reply = await service.UpdateWeights(ksleep_pb2.UpdateWeightsRequest(directory=body.model_path, mode=mode,
                                                                          model=body.model or ""), None)
        except Exception as exc:  # noqa: BLE001
            return failed(exc)
        return {"success": True, "message": f"serving weights version {reply.weights.number} from {reply.weights.source}",
                "weights_version": reply.weights.number, "source": reply.weights.source, "seconds": reply.seconds,
                "stage_seconds": reply.stage_seconds, "swap_seconds": reply.swap_seconds, "pool": reply.pool,
                "num_paused_requests": 0, "aborted_requests": reply.aborted_requests}

    @app.get("/is_sleeping")
    async def is_sleeping(model: str = Query(default="", max_length=4096)):
        if (wrong := unknown_model(model)) is not None:
            return wrong
        return {"is_sleeping": models.get(model).snapshot().asleep}

    @app.get("/health/live")
    async def live():
        """Liveness: the daemon answers (asleep, loading or restarting a worker included)."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready():
        """Readiness: a request sent now would be served (every model awake, or asleep and able to wake)."""
        snapshots = {name: lc.snapshot() for name, lc in models.lifecycles.items()}
        serving = all(now.serving for now in snapshots.values())
        return JSONResponse({"status": "ok" if serving else "unavailable",
                             "models": {name: state_name(now.state) for name, now in snapshots.items()}},
                            status_code=200 if serving else 503)

    @app.get("/health")
    async def health():
        now = models.default.snapshot()
        return JSONResponse({"status": "ok" if now.serving else "unavailable", "state": state_name(now.state)},
                            status_code=200 if now.serving else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _logprobs(tokens, chat: bool) -> dict | None:
    """OpenAI's logprobs object for these tokens (None unless the request asked): chat's `content` list, or the
    completions API's parallel lists."""
    if not tokens or not tokens[0].HasField("logprob"):
        return None
    if chat:
        def entry(t):
            return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}
        return {"content": [{**entry(t.logprob), "top_logprobs": [entry(a) for a in t.top_logprobs]} for t in tokens]}
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.logprob.text for t in tokens], "token_logprobs": [t.logprob.logprob for t in tokens],
            "top_logprobs": [{a.text: a.logprob for a in t.top_logprobs} for t in tokens], "text_offset": offsets}


def _usage(lasts: list[ksleep_pb2.GenerateResponse]) -> dict:
    """Usage of all choices: the prompt once, every choice's completion tokens."""
    prompt = lasts[0].summary.prompt_tokens
    completion = sum(last.summary.completion_tokens for last in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(streams, chat: bool, ident: str, created: int, model: str, include_usage: bool, failed):
    """Server-sent events in OpenAI's chunk format, every choice's chunks as they come, ending with `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, message: ksleep_pb2.GenerateResponse, first_chunk: bool) -> str:
        finish = OPENAI_FINISH.get(finish_name(message.token.finish_reason))
        logprobs = _logprobs([message.token], chat)
        if chat:
            delta = {"role": "assistant", "content": message.token.text} if first_chunk else {"content": message.token.text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": message.token.text, "logprobs": logprobs, "finish_reason": finish}
        return "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    merged: asyncio.Queue = asyncio.Queue()  # (index, message | exception | None); unbounded: each choice is bounded

    async def pump(index: int, rest) -> None:
        try:
            async for message in rest:
                await merged.put((index, message))
            await merged.put((index, None))
        except Exception as exc:  # noqa: BLE001 - reported in-band below
            await merged.put((index, exc))

    lasts = [first for first, _ in streams]
    for i, (first, _) in enumerate(streams):
        yield chunk(i, first, True)
    pumps = [asyncio.create_task(pump(i, rest)) for i, (_, rest) in enumerate(streams)]
    try:
        open_choices = len(streams)
        while open_choices:
            index, item = await merged.get()
            if item is None:
                open_choices -= 1
            elif isinstance(item, Exception):  # the status is already 200: report in-band, then end the stream
                body = json.loads(failed(item).body)
                yield "data: " + json.dumps(body) + "\n\n"
                return
            else:
                lasts[index] = item
                yield chunk(index, item, False)
    finally:
        for task in pumps:
            task.cancel()
    if include_usage:
        yield "data: " + json.dumps({"id": ident, "object": kind, "created": created, "model": model, "choices": [],
                                     "usage": _usage(lasts)}) + "\n\n"
    yield "data: [DONE]\n\n"
