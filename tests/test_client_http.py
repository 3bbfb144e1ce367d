"""The client library, ksleepctl, the OpenAI-compatible HTTP face, metrics and the control token, against a
live daemon on the tiny model."""
import asyncio
import http.client
import json
from pathlib import Path
import os
import socket
import stat
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from ksleep.client import Aborted, AsyncClient, Client, InvalidArgument, Unauthenticated
from ksleep.supervisor.http import MAX_BODY

from .daemon import PROMPT, Daemon

TOKEN = "s3cret-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    port = free_port()
    d = Daemon(tmp, f"ksleep-test-{os.getpid()}-http", "synthetic:tiny", "--idle-timeout", "0",
               "--http", f"127.0.0.1:{port}", "--control-token", TOKEN).wait_ready()
    d.http = f"http://127.0.0.1:{port}"
    d.address = f"unix:{d.socket}"
    yield d
    assert d.stop() == 0, d.output()


@pytest.fixture
def client(daemon):
    with Client(daemon.address, token=TOKEN) as c:
        yield c


def ctl(daemon, *args, token=None):
    env = {**os.environ, "KSLEEP_ADDRESS": daemon.address}
    env.pop("KSLEEP_CONTROL_TOKEN", None)
    if token:
        env["KSLEEP_CONTROL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "ksleep.client", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_client_streams_in_order_and_complete_matches(client):
    tokens = list(client.generate(PROMPT, max_tokens=10))
    assert [t.index for t in tokens] == list(range(10)) and tokens[-1].finish_reason == "length"
    done = client.complete(PROMPT, max_tokens=10)
    assert done.token_ids == [t.id for t in tokens] and done.text == "".join(t.text for t in tokens)
    assert 0 < done.ttft_seconds <= done.total_seconds and done.prompt_tokens > 0


def test_client_errors_are_typed_with_the_server_message(daemon, client):
    with pytest.raises(InvalidArgument, match="max_tokens must be"):
        client.complete(PROMPT, max_tokens=0)
    with Client(daemon.address, token="wrong") as intruder:
        with pytest.raises(Unauthenticated, match="control token"):
            intruder.sleep()
        assert intruder.status().state in ("awake", "asleep")  # Status stays open


def test_abort_reaches_the_client_as_a_typed_error(client, daemon):
    stream = client.generate(PROMPT, max_tokens=150, ignore_eos=True)
    next(stream)
    assert client.sleep(1, abort=True)["aborted_requests"] == 1
    with pytest.raises(Aborted):
        list(stream)
    client.wake()


def test_async_client(daemon, client):
    expected = client.complete(PROMPT, max_tokens=6).token_ids

    async def run():
        async with AsyncClient(daemon.address, token=TOKEN) as aclient:
            streamed = [t.id async for t in aclient.generate(PROMPT, max_tokens=6)]
            done = await aclient.complete(PROMPT, max_tokens=6)
            await aclient.sleep(1)
            state = (await aclient.status()).state
            await aclient.wake()
            return streamed, done.token_ids, state

    streamed, completed, state = asyncio.run(run())
    assert streamed == completed == expected and state == "asleep"


def test_ksleepctl_commands_and_exit_codes(daemon):
    out = ctl(daemon, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    for field in ("state", "sleep_level", "model", "device", "weight_bytes", "device_used_bytes", "device_total_bytes",
                  "worker_device_bytes", "pool_bytes", "worker_pid", "restarts", "in_flight", "idle_seconds",
                  "idle_timeout_seconds", "last_sleep", "last_wake", "last_ttft_seconds"):
        assert field in status
    assert isinstance(status["batch"]["fused"], list)  # repeated fields arrive as JSON lists
    assert ctl(daemon, "status").returncode == 0
    denied = ctl(daemon, "sleep")
    assert denied.returncode == 4 and "UNAUTHENTICATED" in denied.stderr
    slept = ctl(daemon, "sleep", "--level", "1", token=TOKEN)
    assert slept.returncode == 0 and "asleep (level 1): freed" in slept.stdout
    woke = ctl(daemon, "wake", token=TOKEN)
    assert woke.returncode == 0 and "awake: restored" in woke.stdout
    gen = ctl(daemon, "generate", PROMPT, "--max-tokens", "5", "--json")
    assert gen.returncode == 0, gen.stderr
    result = json.loads(gen.stdout)
    assert set(result) == {"text", "token_ids", "finish_reason", "ttft_seconds", "total_seconds"}
    assert len(result["token_ids"]) == 5 and result["ttft_seconds"] > 0
    streamed = ctl(daemon, "generate", PROMPT, "--max-tokens", "5")
    assert streamed.returncode == 0 and streamed.stdout.strip()
    bad = ctl(daemon, "generate", PROMPT, "--max-tokens", "0")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
    usage = ctl(daemon, "sleep", "--level", "7")
    assert usage.returncode == 2
    gone = subprocess.run([sys.executable, "-m", "ksleep.client", "--address", "unix:/nonexistent.sock",
                           "--connect-timeout", "1", "status"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 3 and "no ksleepd answers" in gone.stderr


def test_openai_client_completions_and_chat_match_grpc(daemon, client):
    oa = OpenAI(base_url=daemon.http + "/v1", api_key="unused")
    expected = client.complete(PROMPT, max_tokens=8)
    done = oa.completions.create(model="synthetic:tiny", prompt=PROMPT, max_tokens=8)
    assert done.choices[0].text == expected.text and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens == expected.prompt_tokens
    chunks = list(oa.completions.create(model="synthetic:tiny", prompt=PROMPT, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    messages = [{"role": "user", "content": "Say something."}]
    chat_expected = client.complete(messages, max_tokens=6)
    chat = oa.chat.completions.create(model="synthetic:tiny", messages=messages, max_tokens=6)
    assert chat.choices[0].message.content == chat_expected.text and chat.choices[0].message.role == "assistant"
    pieces = list(oa.chat.completions.create(model="synthetic:tiny", messages=messages, max_tokens=6, stream=True,
                                             stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == chat_expected.text
    assert pieces[-1].usage.completion_tokens == 6
    assert [m.id for m in oa.models.list().data] == ["synthetic:tiny"]


@pytest.mark.parametrize("body", [
    "not json", '{"prompt": 5}', '{"prompt": "x", "max_tokens": -1}', '{"prompt": "x", "temperature": "hot"}',
    '{"prompt": "x", "top_p": 1.5}', '{"prompt": "x", "unknown_field": 1}', '{"prompt": ""}', '[]',
    '{"prompt": "x", "max_tokens": 100000}', '{"prompt": "x", "n": 17}',
    '{"prompt": "x", "max_tokens": 4, "max_completion_tokens": 5}', '{"prompt": "x", "min_tokens": 9, "max_tokens": 4}',
    '{"prompt": "x", "repetition_penalty": 0}', '{"prompt": "x", "stop_token_ids": [-2]}',
])
def test_bad_http_input_is_a_400_with_an_openai_error(daemon, body):
    r = httpx.post(daemon.http + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) >= {"message", "type"} and r.json()["error"]["message"]


def assert_too_large(status: int, body: bytes) -> None:
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and f"{MAX_BODY:,}" in error["message"]


def test_chunked_body_over_the_limit_is_a_413_as_it_streams(daemon):
    def body():  # ~24 MB with no Content-Length: httpx sends a generator chunked
        yield b'{"prompt": "'
        for _ in range(384):
            yield b"x" * (1 << 16)
        yield b'", "max_tokens": 1}'

    start = time.monotonic()
    r = httpx.post(daemon.http + "/v1/completions", content=body(), headers={"content-type": "application/json"},
                   timeout=30)
    assert time.monotonic() - start < 5
    assert_too_large(r.status_code, r.content)
    assert r.headers["connection"] == "close"  # the rest of the body is left unread, not drained
    r = httpx.post(daemon.http + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_content_length_over_the_limit_is_a_413_before_the_body(daemon):
    host, port = daemon.http.removeprefix("http://").split(":")
    for path in ("/v1/completions", "/sleep?level=1"):  # /sleep reads no body: refused before the endpoint runs
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:  # announce a body over the limit but send none of it: only an answer that reads nothing comes back
            conn.putrequest("POST", path)
            for name, value in (("Content-Type", "application/json"), ("Content-Length", str(MAX_BODY + 1)),
                                ("Authorization", f"Bearer {TOKEN}")):
                conn.putheader(name, value)
            conn.endheaders()
            r = conn.getresponse()
            assert_too_large(r.status, r.read())
            assert r.getheader("connection") == "close"
        finally:
            conn.close()
    assert httpx.get(daemon.http + "/is_sleeping").json() == {"is_sleeping": False}


def test_vllm_sleep_endpoints_auto_wake_and_metrics(daemon):
    http = httpx.Client(base_url=daemon.http)
    before = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}
    assert http.post("/sleep", params={"level": 1}).status_code == 401
    assert http.post("/sleep", params={"level": 1}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert vllm_samples(http, "vllm:engine_sleep_state") == {"awake": 0.0, "weights_offloaded": 1.0, "discard_all": 0.0}
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert http.post("/wake_up").status_code == 401
    assert http.post("/wake_up", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert http.get("/health").status_code == 200
    after = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text) for s in f.samples}
    assert after["ksleep_wakes_total"] == before["ksleep_wakes_total"] + 1
    assert after["ksleep_sleeps_total"] == before["ksleep_sleeps_total"] + 1
    assert after["ksleep_generated_tokens_total"] >= before.get("ksleep_generated_tokens_total", 0) + 4
    assert after['ksleep_state'] in (0.0, 1.0) and after["ksleep_wake_seconds_count"] >= 1
    assert after["ksleep_ttft_seconds_count"] > before.get("ksleep_ttft_seconds_count", 0)
    assert any(k.startswith("ksleep_request_errors") for k in after)
    # vLLM's names and labels, which its dashboards and routers read
    assert vllm_samples(http, "vllm:engine_sleep_state") == {"awake": 1.0, "weights_offloaded": 0.0, "discard_all": 0.0}
    assert after["vllm:generation_tokens_total"] >= before.get("vllm:generation_tokens_total", 0) + 4
    assert after["vllm:time_to_first_token_seconds_count"] >= 1 and after["vllm:e2e_request_latency_seconds_count"] >= 1
    assert after["vllm:inter_token_latency_seconds_count"] >= 3 and "vllm:kv_cache_usage_perc" in after
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    sample = families["vllm:num_requests_running"].samples[0]
    assert sample.labels == {"model_name": "synthetic:tiny", "engine": "0"}


def test_vllm_sampling_extensions_are_accepted_on_both_endpoints(daemon):
    # what evalscope perf and other vLLM benchmark clients send
    extras = {"min_tokens": 8, "ignore_eos": True, "top_k": 5, "repetition_penalty": 1.1, "stop_token_ids": [7]}
    done = httpx.post(daemon.http + "/v1/completions", json={"prompt": PROMPT, "max_completion_tokens": 8, **extras})
    assert done.status_code == 200, done.text
    assert done.json()["usage"]["completion_tokens"] == 8
    chat = httpx.post(daemon.http + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extras})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 8, chat.text


def test_n_choices_are_generated_together_and_match_single_requests(daemon):
    url = daemon.http + "/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0.8, "seed": 11, "response_format": {"type": "text"}}
    three = httpx.post(url, json={**body, "n": 3}, timeout=60).json()
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    singles = [httpx.post(url, json={**body, "seed": 11 + i}, timeout=60).json()["choices"][0]["text"] for i in range(3)]
    assert [c["text"] for c in three["choices"]] == singles  # choice i draws with seed + i
    assert three["usage"]["completion_tokens"] == 18
    streamed: dict[int, str] = {}
    with httpx.stream("POST", url, json={**body, "n": 3, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert [streamed[i] for i in range(3)] == singles
    refused = httpx.post(url, json={**body, "response_format": {"type": "json_object"}})
    assert refused.status_code == 400 and "response_format" in refused.text


def test_logprobs_on_both_endpoints(daemon):
    done = httpx.post(daemon.http + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "logprobs": 2}).json()
    lp = done["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 4
    assert all(len(top) <= 2 and x <= 0 for top, x in zip(lp["top_logprobs"], lp["token_logprobs"]))
    chat = httpx.post(daemon.http + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 and "bytes" in c for c in content)
    plain = httpx.post(daemon.http + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).json()
    assert plain["choices"][0]["logprobs"] is None
    refused = httpx.post(daemon.http + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert refused.status_code == 400 and "logprobs" in refused.text


def test_liveness_and_readiness_routes(daemon):
    http = httpx.Client(base_url=daemon.http)
    assert http.get("/health/live").json() == {"status": "ok"}
    ready = http.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["models"]["synthetic:tiny"] in ("awake", "asleep")


def vllm_samples(http, name: str) -> dict:
    family = next(f for f in text_string_to_metric_families(http.get("/metrics").text) if f.name == name)
    return {s.labels["sleep_state"]: s.value for s in family.samples}


def test_unix_socket_is_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_worker_socket_is_private_too(daemon):
    sockets = list((daemon.socket.parent / "run" / "ksleep").glob("worker-*.sock"))
    assert sockets and all(stat.S_IMODE(os.stat(s).st_mode) == 0o600 for s in sockets)


def test_the_client_installs_alone_without_torch_and_talks_to_the_daemon(daemon, tmp_path):
    """The base distribution is the client: a fresh venv gets grpcio, protobuf and rich, not torch."""
    import venv

    root = Path(__file__).resolve().parent.parent
    env = tmp_path / "client-env"
    venv.create(env, with_pip=True)
    install = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", str(root)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    no_torch = subprocess.run([str(env / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode != 0  # nothing pulled it in
    status = subprocess.run([str(env / "bin" / "ksleepctl"), "--address", daemon.address, "status", "--json"],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["model"] == "synthetic:tiny", status.stderr
    out = subprocess.run([str(env / "bin" / "ksleepctl"), "--address", daemon.address, "generate", PROMPT,
                          "--max-tokens", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and len(json.loads(out.stdout)["token_ids"]) == 4, out.stderr
    server = subprocess.run([str(env / "bin" / "ksleepd"), "start", "--model", "synthetic:tiny", "--device", "cpu",
                             "--listen", f"unix:{tmp_path / 'x.sock'}"], capture_output=True, text=True, timeout=60)
    assert server.returncode == 2 and "ksleep[server]" in server.stderr
