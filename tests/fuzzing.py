"""Hypothesis strategies for requests to ksleepd, valid and invalid, shared by tests/test_fuzz.py and
benchmarks/soak.py (which runs them by the ten thousand)."""
from __future__ import annotations

import json

import grpc
from hypothesis import strategies as st

from ksleep.v1 import common_pb2, ksleep_pb2

TEXT = st.text(max_size=120) | st.just("") | st.text(min_size=300, max_size=400)  # empty, normal, beyond context
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 0.5, 1.0, -1.0])


@st.composite
def grpc_requests(draw) -> ksleep_pb2.GenerateRequest:
    kind = draw(st.sampled_from(["text", "ids", "chat", "none"]))
    prompt = common_pb2.Prompt()
    if kind == "text":
        prompt.text = draw(TEXT)
    elif kind == "ids":
        prompt.token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 600), max_size=40)))
    elif kind == "chat":
        for role, content in draw(st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", ""]), TEXT), max_size=3)):
            prompt.chat.messages.add(role=role, content=content)
    params = common_pb2.SamplingParams()
    # Short valid lengths, or lengths beyond any context we serve (131,072 for the 7B): never a long run.
    params.max_tokens = draw(st.integers(0, 8) | st.integers(2**20, 2**32 - 1))
    for name in ("temperature", "top_p"):
        if draw(st.booleans()):
            setattr(params, name, draw(FLOATS))
    if draw(st.booleans()):
        params.top_k = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        params.seed = draw(st.integers(0, 2**64 - 1))
    params.stop.extend(draw(st.lists(st.text(max_size=4), max_size=3)))
    if draw(st.booleans()):
        params.ignore_eos = draw(st.booleans())
    return ksleep_pb2.GenerateRequest(prompt=prompt, params=params)


RAW_BYTES = st.binary(max_size=200)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)


@st.composite
def http_bodies(draw, chat: bool) -> bytes:
    """JSON bodies for /v1/completions or /v1/chat/completions: right, wrong and absurd fields, or raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(RAW_BYTES)  # not JSON, or not UTF-8
    body = {}
    if chat:
        body["messages"] = draw(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                                                 "content": TEXT}), max_size=2) | JSON_VALUES)
    else:
        body["prompt"] = draw(TEXT | st.lists(st.integers(-5, 600), max_size=20) | JSON_VALUES)
    optional = {
        "max_tokens": st.integers(-3, 8) | st.integers(2**20, 2**40) | JSON_VALUES,
        "temperature": st.floats(allow_nan=False) | JSON_VALUES,
        "top_p": st.floats(allow_nan=False) | JSON_VALUES,
        "seed": st.integers() | JSON_VALUES,
        "stop": st.lists(st.text(max_size=3), max_size=2) | JSON_VALUES,
        "stream": st.booleans() | JSON_VALUES,
        "model": st.sampled_from(["synthetic:tiny", "other"]) | JSON_VALUES,
        "unknown_field": JSON_VALUES,
    }
    for name, strategy in optional.items():
        if draw(st.integers(0, 3)) == 0:
            body[name] = draw(strategy)
    if "max_tokens" not in body or not isinstance(body["max_tokens"], int) or body["max_tokens"] > 8:
        body.setdefault("max_tokens", 4)
    return json.dumps(body, allow_nan=True).encode()


def check_grpc(stub, request) -> None:
    """A Generate either streams tokens or is refused with INVALID_ARGUMENT; nothing else is acceptable."""
    try:
        responses = list(stub.Generate(request, timeout=60))
        assert responses and responses[-1].token.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details(), request)
        assert exc.details()


def check_raw_grpc(channel, data: bytes) -> None:
    call = channel.unary_stream("/ksleep.v1.Ksleep/Generate", request_serializer=None, response_deserializer=None)
    try:
        list(call(data, timeout=60))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details(), data)


def check_http(http, path: str, body: bytes) -> None:
    r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text[:300], body[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"]
