"""Faults that must end in an error or a recovery, never a hang; bad input that changes nothing (CPU)."""
import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ksleep.supervisor.admission import Gate
from ksleep.supervisor.config import DaemonConfig
from ksleep.supervisor.launcher import Forkserver
from ksleep.supervisor.lifecycle import Lifecycle
from ksleep.supervisor.server import status_message
from ksleep.v1 import common_pb2, ksleep_pb2, ksleep_pb2_grpc
from ksleep.worker.limits import MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOP_STRINGS

from .daemon import Daemon, request

S = common_pb2


@pytest.fixture
def start_daemon(tmp_path, prefix):
    daemons = []

    def start(*flags, env=None):
        daemon = Daemon(tmp_path, prefix, "synthetic:tiny", "--idle-timeout", "0", *flags, env=env)
        daemons.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in daemons:
        for proc in daemon.processes()[1:]:  # a worker a test stopped must not outlive it
            if proc.status() == "stopped":
                proc.send_signal(signal.SIGCONT)
        daemon.stop()


def chat(n: int) -> ksleep_pb2.GenerateRequest:
    messages = [common_pb2.Prompt.ChatMessage(role="user", content="hi")] * n
    return ksleep_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat=common_pb2.Prompt.Chat(messages=messages)),
                                      params=common_pb2.SamplingParams(max_tokens=4))


BAD_REQUESTS = {
    "max_tokens 0": request(max_tokens=0),
    "no prompt": ksleep_pb2.GenerateRequest(params=common_pb2.SamplingParams(max_tokens=4)),
    "too many stop strings": request(stop=["x"] * (MAX_STOP_STRINGS + 1)),
    "a stop string too long": request(stop=["y" * (MAX_STOP_CHARS + 1)]),
    "too many messages": chat(MAX_MESSAGES + 1),
    "longer than the context": ksleep_pb2.GenerateRequest(  # synthetic:tiny has a 256-token context
        prompt=common_pb2.Prompt(token_ids=common_pb2.Prompt.TokenIds(ids=[5] * 250)),
        params=common_pb2.SamplingParams(max_tokens=10)),
    "negative temperature": request(temperature=-1.0),
}


@pytest.mark.parametrize("level", [1, 3])
def test_invalid_requests_while_asleep_are_refused_without_waking_anything(start_daemon, level):
    daemon = start_daemon()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=level), timeout=60)
    before = daemon.status()
    for name, bad in BAD_REQUESTS.items():
        with pytest.raises(grpc.RpcError) as err:
            daemon.generate(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    after = daemon.status()
    assert (after.state, after.sleep_level, after.wakes_total, after.worker_pid, after.in_flight) == (
        S.STATE_ASLEEP, before.sleep_level, before.wakes_total, before.worker_pid, 0)
    assert len(daemon.generate(request(max_tokens=3))) == 3  # a good one still wakes it and is served


def test_a_stopped_worker_is_killed_within_the_timeout_and_its_waiting_request_is_served(start_daemon):
    daemon = start_daemon("--worker-timeout", "1.5")
    want = daemon.ids(request(max_tokens=8))
    worker = daemon.status().worker_pid
    os.kill(worker, signal.SIGSTOP)  # as a wedged driver call would leave it: alive, answering nothing
    t0 = time.monotonic()
    got = daemon.ids(request(max_tokens=8))  # sent to the stopped worker; replayed on its successor
    recovered = time.monotonic() - t0
    status = daemon.status()
    assert got == want and status.restarts == 1 and status.worker_pid not in (0, worker)
    assert status.state == S.STATE_AWAKE
    assert recovered < 1.5 + 20, f"recovery took {recovered:.1f} s"


def test_a_wait_sleep_drains_for_a_bounded_time_then_aborts_a_stream_nobody_reads(start_daemon):
    # each step 50 ms longer: a 200-token stream lasts 10 s, far past the 1 s drain
    daemon = start_daemon("--drain-timeout", "1", env={"KSLEEP_FAULT_STEP_DELAY": "0.05"})
    stalled = daemon.stub.Generate(request(max_tokens=200, ignore_eos=True), timeout=120)
    next(stalled)  # admitted and streaming; never read again
    t0 = time.monotonic()
    reply = daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1, mode=ksleep_pb2.SLEEP_MODE_WAIT), timeout=30)
    took = time.monotonic() - t0
    assert reply.aborted_requests == 1 and 1.0 <= took < 8, took
    assert daemon.status().state == S.STATE_ASLEEP
    with pytest.raises(grpc.RpcError) as err:
        list(stalled)
    assert err.value.code() == grpc.StatusCode.ABORTED
    served = []  # and the daemon serves the next user at once (waking for it)
    thread = threading.Thread(target=lambda: served.append(daemon.ids(request(max_tokens=3))))
    thread.start()
    thread.join(30)
    assert served and len(served[0]) == 3


@pytest.mark.parametrize("how", ["request", "wake_up"])
def test_a_worker_that_fell_asleep_by_itself_is_followed_and_woken_once(start_daemon, tmp_path, how):
    from ksleep.v1 import worker_pb2, worker_pb2_grpc

    daemon = start_daemon()
    want = daemon.ids(request(max_tokens=5))
    wakes = daemon.status().wakes_total
    (socket,) = (tmp_path / "run" / "ksleep").glob("worker-*.sock")
    with grpc.insecure_channel(f"unix:{socket}") as channel:  # behind ksleepd's back, as a failed rebuild would
        worker_pb2_grpc.WorkerStub(channel).Sleep(worker_pb2.WorkerSleepRequest(level=1), timeout=30)
    assert daemon.status().state == S.STATE_AWAKE  # ksleepd does not know yet
    if how == "wake_up":
        daemon.stub.WakeUp(ksleep_pb2.WakeUpRequest(), timeout=60)
    assert daemon.ids(request(max_tokens=5)) == want  # refused as asleep by the worker, retried after one wake
    status = daemon.status()
    assert status.state == S.STATE_AWAKE and status.wakes_total == wakes + 1 and status.restarts == 0


def test_the_gate_opens_only_when_the_last_sleep_holding_it_is_done():
    async def run():
        gate = Gate()
        first, second = gate.closed(), gate.closed()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # the first sleep is done; the second still holds admission
        assert not gate.is_open
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gate.wait_open(), 0.05)
        second.__exit__(None, None, None)
        await asyncio.wait_for(gate.wait_open(), 1)
        assert gate.is_open

    asyncio.run(run())


def test_an_exit_is_never_reported_for_a_recycled_pid():
    async def run():
        forkserver = Forkserver("info")
        old = forkserver.exit_future(4242)
        old.set_result(0)  # that worker exited; its entry leaves the table
        await asyncio.sleep(0)
        fresh = forkserver.exit_future(4242)  # a new worker that got the same pid
        assert not fresh.done()
        forkserver._early_exits[4343] = (time.monotonic(), 9)  # died before its handle was made
        assert forkserver.exit_future(4343).result() == 9
        assert not forkserver.exit_future(4343).done()  # reported once only

    asyncio.run(run())


class _FailingBackend:
    name = "nvml"

    def read(self, pid):
        raise RuntimeError("NVML_ERROR_UNKNOWN (injected)")


def test_a_failed_memory_reading_leaves_the_figure_out_not_the_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    async def run():
        lc = Lifecycle(DaemonConfig(model="synthetic:tiny", device="cpu"))
        lc.memory_backend = _FailingBackend()
        sample = await lc.sample()
        assert sample.device_used is None
        status = status_message(lc)
        assert status.device_used_bytes == 0 and status.memory_source == "nvml"

    asyncio.run(run())


def test_a_client_that_stops_reading_is_cancelled_at_its_backlog_and_holds_up_no_sleep(start_daemon):
    # a 4-token backlog; the client's connection buffers ~1 KiB (no window growth), so it stalls within ~40 tokens
    daemon = start_daemon("--stream-backlog", "4", "--drain-timeout", "30", env={"KSLEEP_FAULT_STEP_DELAY": "0.01"})
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(f"unix:{daemon.socket}", options=options) as channel:
        stalled = ksleep_pb2_grpc.KsleepStub(channel).Generate(request(max_tokens=200, ignore_eos=True), timeout=120)
        next(stalled)  # streaming; never read again
        deadline = time.monotonic() + 30
        while daemon.status().in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.status().in_flight == 0, "the stalled stream still holds its ticket"
        t0 = time.monotonic()
        reply = daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1, mode=ksleep_pb2.SLEEP_MODE_WAIT), timeout=60)
        assert reply.aborted_requests == 0 and time.monotonic() - t0 < 10
        assert len(daemon.generate(request(max_tokens=3))) == 3  # another user is served meanwhile
        with pytest.raises(grpc.RpcError) as err:
            list(stalled)  # reading again: what was buffered, then the reason
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "unread" in err.value.details()


def _wait_restarted(daemon, old_pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = daemon.status()
        if status.state == S.STATE_AWAKE and status.worker_pid not in (0, old_pid):
            return status.worker_pid
        time.sleep(0.02)
    raise AssertionError(f"no new worker after {timeout} s:\n{daemon.output()}")


def test_health_says_not_serving_while_the_worker_is_down_and_serving_again_after(start_daemon):
    daemon = start_daemon()
    health = health_pb2_grpc.HealthStub(daemon.channel)
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    service = "ksleep.v1.Ksleep"
    assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
    assert next(watch).status == SERVING
    os.kill(daemon.status().worker_pid, signal.SIGKILL)
    assert next(watch).status == NOT_SERVING  # the worker is dead: a request would wait for its restart
    assert health.Check(health_pb2.HealthCheckRequest(service="live"), timeout=5).status == SERVING  # ksleepd is
    assert next(watch).status == SERVING  # restarted from the pool
    assert health.Check(health_pb2.HealthCheckRequest(service="ready"), timeout=5).status == SERVING
    watch.cancel()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1), timeout=60)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING  # asleep still serves


def test_a_pool_checksum_failure_relayed_from_the_worker_reaches_clients_as_unavailable():
    from ksleep.worker.interceptor import status_for

    relayed = grpc.aio.AioRpcError(grpc.StatusCode.DATA_LOSS, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="weight pool checksum mismatch in bytes 0-2,097,152 (embed)")
    code, message = status_for(relayed)
    assert code == grpc.StatusCode.UNAVAILABLE and "checksum" in message and "retry" in message


def test_a_hundred_worker_crashes_in_a_row_leave_descriptors_threads_and_rss_flat(start_daemon, prefix):
    daemon = start_daemon("--restart-backoff", "0")
    want = daemon.ids(request(max_tokens=4))
    supervisor = psutil.Process(daemon.proc.pid)

    def crashes(n: int) -> None:
        for _ in range(n):
            pid = daemon.status().worker_pid
            os.kill(pid, signal.SIGKILL)
            _wait_restarted(daemon, pid)

    crashes(10)  # the first restarts settle the allocator and gRPC's thread pools
    time.sleep(1)  # dead workers' channels close once their requests have failed over
    before = (supervisor.num_fds(), supervisor.num_threads(), supervisor.memory_info().rss)
    crashes(90)
    time.sleep(1)
    fds, threads, rss = supervisor.num_fds(), supervisor.num_threads(), supervisor.memory_info().rss
    assert fds <= before[0] + 2 and threads <= before[1] + 1, (before, fds, threads)
    assert rss <= before[2] + (16 << 20), f"RSS grew by {(rss - before[2]) >> 20} MiB over 90 crashes"
    assert len(daemon.processes()) == 3  # ksleepd, the forkserver, one worker
    assert len(list(Path("/dev/shm").glob(f"{prefix}*"))) == 2  # the pool and its manifest, nothing half-made
    assert daemon.ids(request(max_tokens=4)) == want and daemon.status().restarts == 100
