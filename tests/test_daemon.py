"""ksleepd end to end on CPU: a real supervisor, forkserver and worker, over gRPC."""
import os
import signal
import threading
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ksleep.v1 import common_pb2, ksleep_pb2

from .conftest import pool_files
from .daemon import Daemon, request

S = common_pb2


@pytest.fixture
def start_daemon(tmp_path, prefix):
    daemons = []

    def start(model="synthetic:tiny", *flags, ready=True, env=None):
        daemon = Daemon(tmp_path, prefix, model, *flags, env=env)
        daemons.append(daemon)
        return daemon.wait_ready() if ready else daemon

    yield start
    for daemon in daemons:
        pids = [p.pid for p in daemon.processes()] if daemon.proc.poll() is None else []
        code = daemon.stop()
        assert code == 0, daemon.output()
        assert not daemon.socket.exists(), "the public socket outlived ksleepd"
        assert not list((tmp_path / "run").glob("**/worker-*.sock")), "a worker socket outlived ksleepd"
        assert pool_files(prefix) == [], "the pool outlived ksleepd"
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_idle_sleep_then_auto_wake_gives_identical_output(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "1")
    baseline = daemon.generate()
    assert baseline[-1].token.finish_reason == S.FINISH_REASON_LENGTH
    status = daemon.wait_for_state(S.STATE_ASLEEP, timeout=30)
    assert status.sleep_level == 1 and status.last_sleep.bytes > 0 and status.sleeps_total >= 1
    wakes = status.wakes_total
    again = daemon.generate()
    assert [r.token.id for r in again] == [r.token.id for r in baseline]
    assert "".join(r.token.text for r in again) == "".join(r.token.text for r in baseline)
    assert again[-1].summary.woke is True and again[-1].summary.ttft_seconds > 0
    status = daemon.status()
    assert status.wakes_total == wakes + 1 and status.last_wake.source == "mirror" and status.last_ttft_seconds > 0


def test_eight_requests_while_asleep_share_one_wake(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    baseline = daemon.ids()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1))
    assert daemon.status().state == S.STATE_ASLEEP
    results, errors = [None] * 8, []

    def run(i):
        try:
            results[i] = daemon.ids()
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    steps = daemon.status().batch.steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [baseline] * 8
    status = daemon.status()
    assert status.wakes_total == 1 and status.state == S.STATE_AWAKE
    assert status.batch.steps - steps < 2 * 12  # batched: one prefill for (nearly) all, then 11 decode steps


def test_worker_killed_mid_stream_gives_unavailable_then_a_restarted_worker_serves(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    baseline = daemon.ids()
    first = daemon.status()
    stream = daemon.stub.Generate(request(max_tokens=200, ignore_eos=True), timeout=60)
    next(stream)
    t0 = time.monotonic()
    os.kill(first.worker_pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert time.monotonic() - t0 < 10
    assert daemon.ids() == baseline  # waits for the restart
    status = daemon.status()
    assert status.restarts == 1 and status.worker_pid not in (0, first.worker_pid)
    assert status.worker_load_source == "attached"  # the pool, not the checkpoint


def test_level3_sleep_stops_the_worker_and_wake_spawns_one(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    baseline = daemon.ids()
    pid = daemon.status().worker_pid
    reply = daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=3))
    assert reply.sleep.level == 3
    status = daemon.status()
    assert status.state == S.STATE_ASLEEP and status.sleep_level == 3 and status.worker_pid == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert status.pool_bytes > 0  # the pool stays for the next worker
    assert daemon.ids() == baseline
    status = daemon.status()
    assert status.last_wake.source == "spawn" and status.worker_load_source == "attached" and status.restarts == 0


def test_sleep_waits_for_streams_or_aborts_them(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    streams = [daemon.stub.Generate(request(p, max_tokens=150, ignore_eos=True), timeout=60) for p in ("a", "b", "c")]
    for stream in streams:
        next(stream)  # all three decode in one batch
    reply = daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1, mode=ksleep_pb2.SLEEP_MODE_ABORT), timeout=60)
    assert reply.aborted_requests == 3
    for stream in streams:
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.ABORTED
    daemon.stub.WakeUp(ksleep_pb2.WakeUpRequest())
    streams = [daemon.stub.Generate(request(p, max_tokens=60, ignore_eos=True), timeout=60) for p in ("a", "b", "c")]
    for stream in streams:
        next(stream)
    waited = daemon.stub.Sleep.future(ksleep_pb2.SleepRequest(level=1), timeout=60)
    for stream in streams:  # WAIT mode: every stream of the batch finishes normally, then the model sleeps
        rest = list(stream)
        assert len(rest) == 59 and rest[-1].token.finish_reason == S.FINISH_REASON_LENGTH
    assert waited.result().sleep.level == 1
    assert daemon.status().batch.running == 0


def test_the_batch_and_its_cache_are_in_status_and_bounds_give_clear_errors(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0", "--kv-cache", "40KiB", "--max-batch", "1",
                          "--max-queue", "1", "--sample-interval", "0.2",
                          env={"KSLEEP_FAULT_STEP_DELAY": "0.05"})  # the running request lasts a second
    batch = daemon.status().batch
    assert (batch.kv_cache_tokens, batch.max_batch, batch.max_queue, batch.attention) == (80, 1, 1, "gather")
    assert batch.kv_cache_bytes == 80 * 512 and batch.running == batch.waiting == 0
    with pytest.raises(grpc.RpcError) as err:  # more positions than the whole cache: refused at once
        daemon.generate(request(max_tokens=100))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 64" in err.value.details()
    running = daemon.stub.Generate(request(max_tokens=20, ignore_eos=True), timeout=60)
    next(running)
    queued = daemon.stub.Generate(request(max_tokens=20, ignore_eos=True), timeout=60)
    deadline = time.monotonic() + 10
    while daemon.status().batch.waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:  # the queue (of one) is full
        daemon.generate(request(max_tokens=20))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already waiting" in err.value.details()
    assert len(list(running)) == 19 and len(list(queued)) == 20  # both served, in turn
    assert len(daemon.ids()) == 12


def test_bad_input_gets_invalid_argument_and_the_daemon_keeps_serving(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    bad = [request(max_tokens=0), ksleep_pb2.GenerateRequest(), request(top_p=1.5), request("x" * 400)]
    for req in bad:
        with pytest.raises(grpc.RpcError) as err:
            daemon.generate(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=7))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(daemon.ids()) == 12


def test_health_reflection_status_and_history(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0", "--sample-interval", "0.2")
    health = health_pb2_grpc.HealthStub(daemon.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"ksleep.v1.Ksleep", "grpc.health.v1.Health"} <= names
    daemon.stub.Sleep(ksleep_pb2.SleepRequest())
    daemon.stub.WakeUp(ksleep_pb2.WakeUpRequest())
    status = daemon.status(include_history=True)
    assert status.model == "synthetic:tiny" and status.device == "cpu" and status.weight_bytes > 0
    assert status.device_total_bytes > 0 and status.pool_bytes > 0 and status.worker_pid > 0
    assert status.idle_timeout_seconds == 0 and status.configured_sleep_level == 1
    states = {s.state for s in status.history}
    assert {S.STATE_AWAKE, S.STATE_ASLEEP} <= states and all(s.device_used_bytes > 0 for s in status.history)


def test_unknown_model_fails_fast_with_a_clear_message(start_daemon, prefix):
    daemon = start_daemon("no-such-model", ready=False)
    assert daemon.proc.wait(120) == 1
    assert "no-such-model" in daemon.output() and "is not a directory, a ModelScope id" in daemon.output()
    assert pool_files(prefix) == []
    daemon.proc.returncode = 0  # checked: let the fixture's clean-exit assertions pass


def test_a_taken_socket_is_refused_and_a_stale_one_replaced(start_daemon, tmp_path):
    first = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    second = start_daemon("synthetic:tiny", ready=False)
    assert second.proc.wait(60) == 1 and "is taken: another ksleepd is listening" in second.output()
    second.proc.returncode = 0
    assert len(first.ids()) == 12


def test_killing_the_supervisor_takes_the_worker_with_it(start_daemon):
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0")
    children = daemon.processes()[1:]
    assert len(children) == 2  # forkserver and worker
    daemon.proc.kill()
    daemon.proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"orphans: {alive}"
    daemon.proc.returncode = 0
    daemon.socket.unlink(missing_ok=True)  # a killed daemon cannot clean up; the next start replaces it
    for path in pool_files(daemon.prefix):
        path.unlink()


@pytest.mark.slow
def test_smollm2_daemon_sleeps_and_wakes_with_identical_text(start_daemon):
    daemon = start_daemon("smollm2-135m", "--idle-timeout", "1")
    baseline = daemon.generate(request(max_tokens=16))
    text = "".join(r.token.text for r in baseline)
    assert sum(ch.isalpha() for ch in text) > 20
    daemon.wait_for_state(S.STATE_ASLEEP, timeout=60)
    again = daemon.generate(request(max_tokens=16))
    assert "".join(r.token.text for r in again) == text and again[-1].summary.woke
