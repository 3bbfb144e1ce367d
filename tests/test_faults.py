"""The fault matrix: each fault ends with the daemon serving and its outputs identical to the baseline."""
import os
import signal
import threading
import time

import grpc
import psutil
import pytest

from ksleep.v1 import common_pb2, ksleep_pb2

from .conftest import pool_files
from .daemon import Daemon, request

S = common_pb2


@pytest.fixture
def start(tmp_path, prefix):
    daemons = []

    def run(*flags, env=None, ready=True):
        daemon = Daemon(tmp_path, prefix, "synthetic:tiny", "--idle-timeout", "0", *flags, env=env)
        daemons.append(daemon)
        return daemon.wait_ready() if ready else daemon

    yield run
    for daemon in daemons:
        if daemon.proc.poll() is None:
            assert daemon.stop() == 0, daemon.output()
    for path in pool_files(prefix):
        path.unlink()


def kill_worker_during(daemon, call, *args):
    """Start `call` in a thread, SIGKILL the worker while it runs, return (result or error)."""
    pid = daemon.status().worker_pid
    outcome = {}

    def run():
        try:
            outcome["result"] = call(*args, timeout=60)
        except grpc.RpcError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.8)  # inside the injected 3 s transition
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    return outcome


def test_worker_killed_during_sleep(start):
    daemon = start(env={"KSLEEP_FAULT_TRANSITION_DELAY": "3"})
    baseline = daemon.ids()
    outcome = kill_worker_during(daemon, daemon.stub.Sleep, ksleep_pb2.SleepRequest(level=1))
    assert "error" in outcome and outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert daemon.ids() == baseline and daemon.status().restarts == 1


def test_worker_killed_during_wake_the_waiting_request_still_succeeds(start):
    daemon = start(env={"KSLEEP_FAULT_TRANSITION_DELAY": "3"})
    baseline = daemon.ids()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1), timeout=60)
    outcome = kill_worker_during(daemon, lambda req, timeout: [r.token.id for r in daemon.stub.Generate(req, timeout=timeout)],
                                 request())
    assert outcome.get("result") == baseline, outcome  # replayed on the restarted worker
    assert daemon.status().restarts == 1 and daemon.ids() == baseline


def test_device_memory_taken_while_asleep(start, tmp_path):
    flag = tmp_path / "device-full"
    daemon = start(env={"KSLEEP_FAULT_ALLOC_FAIL_FILE": str(flag)})
    baseline = daemon.ids()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1))
    flag.touch()
    with pytest.raises(grpc.RpcError) as err:
        daemon.ids()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no room on the device" in err.value.details()
    status = daemon.status()
    assert status.state == S.STATE_ASLEEP and status.restarts == 0  # asleep and healthy, nothing crashed
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub.WakeUp(ksleep_pb2.WakeUpRequest())
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    flag.unlink()
    assert daemon.ids() == baseline and daemon.status().state == S.STATE_AWAKE


def test_shm_too_small_at_start_is_a_clear_error_and_leaves_nothing(start, prefix):
    daemon = start(env={"KSLEEP_FAULT_SHM_FREE_BYTES": "4096"}, ready=False)
    assert daemon.proc.wait(120) == 1
    assert "the weight pool needs 14,680,064 bytes; /dev/shm has 4,096 bytes free" in daemon.output()
    assert pool_files(prefix) == []


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_pool_damaged_under_a_sleeping_daemon_is_rebuilt(start, prefix, damage):
    daemon = start()
    baseline = daemon.ids()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1))
    pool = next(p for p in pool_files(prefix) if p.suffix == ".pool")
    if damage == "corrupt":
        with open(pool, "r+b") as f:
            f.seek(1000)
            f.write(b"\x55" * 64)
    else:
        os.truncate(pool, 1 << 20)
    assert daemon.ids() == baseline  # never served from the damaged mirror
    wake = daemon.status().last_wake
    if damage == "truncate":  # caught before the copy: the wake itself rebuilt the pool
        assert wake.source == "source"
    else:  # caught by the checksum behind the request's first forward, which re-ran on rebuilt weights
        assert wake.overlapped
        with open(pool, "rb") as f:
            f.seek(1000)
            assert f.read(64) != b"\x55" * 64
    assert daemon.ids() == baseline


def test_supervisor_killed_then_the_next_start_attaches_to_the_verified_pool(start, prefix):
    first = start()
    baseline = first.ids()
    children = first.processes()[1:]
    first.proc.kill()
    first.proc.wait()
    psutil.wait_procs(children, timeout=30)
    assert any(p.suffix == ".pool" for p in pool_files(prefix)), "the pool should have outlived the killed daemon"
    first.socket.unlink(missing_ok=True)
    second = start()
    assert second.status().worker_load_source == "attached"
    assert second.ids() == baseline


def test_storm_of_sleeps_wakes_and_requests(start):
    daemon = start()
    baseline = daemon.ids()
    errors, results, stop = [], [], threading.Event()

    def generator():
        while not stop.is_set():
            try:
                results.append(daemon.ids())
            except grpc.RpcError as exc:
                errors.append(exc)

    def controller(level):
        while not stop.is_set():
            try:
                daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=level), timeout=60)
                daemon.stub.WakeUp(ksleep_pb2.WakeUpRequest(), timeout=60)
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=generator) for _ in range(6)]
    threads += [threading.Thread(target=controller, args=(level,)) for level in (1, 2, 3)]
    for t in threads:
        t.start()
    time.sleep(12)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "deadlock: a client never returned"
    assert not errors, [e.details() for e in errors][:5]
    assert results and all(r == baseline for r in results)
    status = daemon.status()
    assert status.in_flight == 0 and status.restarts == 0 and status.sleeps_total > 3 and status.wakes_total > 3
