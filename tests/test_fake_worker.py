"""The supervisor against an in-process fake worker (tests/fakeworker.py): replies delayed, dropped, in the wrong
state, or never coming. Each race is set up exactly, without timing luck; each case ends in an answer or a clear
error within a bound, never a hang."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ksleep.supervisor.config import DaemonConfig
from ksleep.supervisor.lifecycle import WorkerGoneError
from ksleep.supervisor.server import KsleepService
from ksleep.v1 import common_pb2, ksleep_pb2

from .fakeworker import TOKENS, FakeLifecycle, wait_until

S = common_pb2
TIMEOUT = 1.0  # --worker-timeout of these tests


def request() -> ksleep_pb2.GenerateRequest:
    return ksleep_pb2.GenerateRequest(prompt=common_pb2.Prompt(token_ids=common_pb2.Prompt.TokenIds(ids=[1, 2, 3])),
                                      params=common_pb2.SamplingParams(max_tokens=len(TOKENS)))


async def generate(service: KsleepService) -> list[int]:
    return [message.token.id async for message in service.Generate(request(), None)]


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """run(body, *scripts): body(lifecycle, service) against fakes following `scripts` (one per worker started)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    def run(body, *scripts, within: float = 30.0):
        async def main():
            config = DaemonConfig(model="fake", device="cpu", idle_timeout=0, worker_timeout=TIMEOUT, keep_pool=True,
                                  sample_interval=60, drain_timeout=5)
            lc = FakeLifecycle(config, tmp_path, *scripts)
            await lc.start()
            try:
                await asyncio.wait_for(body(lc, KsleepService(lc, lc.metrics)), within)  # a hang fails the test
            finally:
                await lc.close()

        asyncio.run(main())

    return run


def test_a_worker_that_stops_answering_is_killed_and_its_waiting_request_replayed(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script.update(Status="hang", Generate="hang")  # a SIGSTOPped worker, as it looks
        t0 = time.monotonic()
        assert await generate(service) == TOKENS  # no token had left: replayed, unseen, on the new worker
        recovered = time.monotonic() - t0
        assert lc.handles[0].exited.done() and len(lc.handles) == 2 and lc.restarts == 1
        assert recovered < TIMEOUT + 3, recovered
        assert lc.state == S.STATE_AWAKE

    daemon(body)


def test_a_slow_reply_within_the_timeout_is_not_a_hang(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script.update(Status=("delay", TIMEOUT / 2), Generate=("delay", TIMEOUT * 2))
        lc.handles[0].answered = 0.0  # the watchdog pings at once, and again while Generate is slow
        assert await generate(service) == TOKENS
        assert lc.restarts == 0 and len(lc.handles) == 1 and lc.calls["Status"] >= 2

    daemon(body)


def test_a_worker_asleep_behind_our_back_is_followed_and_woken_once(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script["Generate"] = "asleep"
        results = await asyncio.gather(*(generate(service) for _ in range(4)))
        assert results == [TOKENS] * 4
        assert lc.wakes_total == 1 and lc.calls["Wake"] == 1 and lc.restarts == 0
        assert lc.state == S.STATE_AWAKE

    daemon(body)


def test_wake_up_asks_the_worker_before_answering_awake(daemon):
    async def body(lc, service):
        fake = lc.handles[0].servicer
        fake.state, fake.level = S.STATE_ASLEEP, 1  # put to sleep through its own socket
        assert lc.state == S.STATE_AWAKE
        wake = (await service.WakeUp(ksleep_pb2.WakeUpRequest(), None)).wake
        assert wake.source == "mirror" and lc.wakes_total == 1 and fake.state == S.STATE_AWAKE
        again = (await service.WakeUp(ksleep_pb2.WakeUpRequest(), None)).wake
        assert again.seconds == 0 and lc.wakes_total == 1  # awake, and the worker says so: nothing to do

    daemon(body)


def test_a_stream_dropped_before_its_first_token_is_replayed(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script["Generate"] = "die"
        assert await generate(service) == TOKENS
        assert lc.restarts == 1 and len(lc.handles) == 2

    daemon(body)


def test_a_stream_dropped_after_a_token_fails_clearly_and_the_next_request_is_served(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script["Generate"] = "die_after_token"
        seen = []
        with pytest.raises(WorkerGoneError, match="died during this request"):  # UNAVAILABLE on the wire
            async for message in service.Generate(request(), None):
                seen.append(message.token.id)
        assert seen == TOKENS[:1]  # what left cannot be taken back: the client sees the error, not a replay
        assert await generate(service) == TOKENS
        assert lc.restarts == 1

    daemon(body)


def test_requests_that_arrive_asleep_share_one_slow_wake(daemon):
    async def body(lc, service):
        await service.Sleep(ksleep_pb2.SleepRequest(level=1), None)
        lc.handles[0].servicer.script["Wake"] = ("delay", 0.3)
        results = await asyncio.gather(*(generate(service) for _ in range(6)))
        assert results == [TOKENS] * 6 and lc.calls["Wake"] == 1 and lc.wakes_total == 1

    daemon(body)


def test_a_worker_that_hangs_in_its_wake_is_replaced_and_the_waiting_requests_served(daemon):
    async def body(lc, service):
        await service.Sleep(ksleep_pb2.SleepRequest(level=1), None)
        lc.handles[0].servicer.script.update(Wake="hang", Status="hang")
        t0 = time.monotonic()
        results = await asyncio.gather(*(generate(service) for _ in range(3)))
        assert results == [TOKENS] * 3 and lc.restarts == 1
        assert time.monotonic() - t0 < TIMEOUT + 3

    daemon(body)


def test_a_worker_that_hangs_in_its_sleep_fails_the_sleep_and_is_replaced(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script.update(Sleep="hang", Status="hang")
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await service.Sleep(ksleep_pb2.SleepRequest(level=1), None)
        assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert time.monotonic() - t0 < TIMEOUT + 3
        await wait_until(lambda: lc.state == S.STATE_AWAKE and len(lc.handles) == 2, 5, "the restart")
        assert await generate(service) == TOKENS

    daemon(body)


def test_a_status_that_hangs_never_holds_up_the_daemons_status(daemon):
    async def body(lc, service):
        lc.handles[0].servicer.script["Status"] = "hang"
        t0 = time.monotonic()
        status = await service.Status(ksleep_pb2.StatusRequest(), None)
        assert time.monotonic() - t0 < 6  # the worker's Status has its deadline (and the watchdog acts meanwhile)
        assert status.state in (S.STATE_AWAKE, S.STATE_STOPPED, S.STATE_LOADING)

    daemon(body)
