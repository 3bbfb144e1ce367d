"""Property-based fuzzing of the gRPC API and the HTTP face: every request is served or refused with
INVALID_ARGUMENT / 400 (a wrong model name: 404), never an internal error, and the daemon keeps serving.
CI runs a bounded number of cases; benchmarks/soak.py runs them by the ten thousand."""
import os
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from .daemon import PROMPT, Daemon
from .fuzzing import RAW_BYTES, check_grpc, check_http, check_raw_grpc, grpc_requests, http_bodies

FUZZ = settings(max_examples=int(os.environ.get("KSLEEP_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Daemon(tmp_path_factory.mktemp("fuzz"), f"ksleep-test-{os.getpid()}-fuzz", "synthetic:tiny",
               "--idle-timeout", "0", "--http", f"127.0.0.1:{port}").wait_ready()
    d.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    d.baseline = d.ids()
    yield d
    assert d.ids() == d.baseline, "the daemon must still answer a normal request correctly"
    assert d.stop() == 0, d.output()


@FUZZ
@given(request=grpc_requests())
def test_grpc_generate(daemon, request):
    check_grpc(daemon.stub, request)


@FUZZ
@given(data=RAW_BYTES)
def test_grpc_raw_bytes(daemon, data):
    check_raw_grpc(daemon.channel, data)


@FUZZ
@given(body=http_bodies(chat=False))
def test_http_completions(daemon, body):
    check_http(daemon.http, "/v1/completions", body)


@FUZZ
@given(body=http_bodies(chat=True))
def test_http_chat(daemon, body):
    check_http(daemon.http, "/v1/chat/completions", body)


def test_oversized_http_body_is_refused(daemon):
    r = daemon.http.post("/v1/completions", content=b"x" * (17 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]
    assert [t.token.id for t in daemon.generate()] == daemon.baseline


def test_unknown_fields_and_bad_utf8_on_the_wire_are_invalid_argument(daemon):
    import grpc

    from ksleep.v1 import common_pb2, ksleep_pb2

    good = ksleep_pb2.GenerateRequest(prompt=common_pb2.Prompt(text=PROMPT)).SerializeToString()
    call = daemon.channel.unary_stream("/ksleep.v1.Ksleep/Generate")
    for data in (good + b"\xf8\x07\x01", b"\x0a\x04\x0a\x02\xff\xfe"):  # field 127; prompt.text of bad UTF-8
        with pytest.raises(grpc.RpcError) as err:
            list(call(data, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert len(list(call(good, timeout=30))) == 16  # the same bytes, well-formed, are served
