"""--standby end to end on CPU: a spare worker, warmed up and asleep, replaces a worker that dies."""
import os
import signal
import time

import psutil

from ksleep.client import Client
from ksleep.v1 import common_pb2, ksleep_pb2

from .daemon import Daemon
from .test_daemon import start_daemon  # noqa: F401 - the fixture

S = common_pb2


def wait_for_standby(daemon: Daemon, not_in: tuple[int, ...] = (), timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = daemon.status().standby_pid
        if pid and pid not in not_in:
            return pid
        time.sleep(0.1)
    raise AssertionError(f"no standby worker after {timeout} s:\n{daemon.output()}")


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_killed_worker_is_replaced_by_the_standby_awake_and_asleep(start_daemon):  # noqa: F811
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0", "--standby")
    baseline = daemon.ids()
    first = daemon.status().worker_pid
    spare = wait_for_standby(daemon)
    assert spare != first and psutil.pid_exists(spare)
    with Client(f"unix:{daemon.socket}") as client:
        assert client.status().standby_pid == spare

    os.kill(first, signal.SIGKILL)  # awake: the spare takes over and is woken at once
    assert daemon.ids() == baseline
    status = daemon.status()
    assert status.worker_pid == spare and status.restarts == 1 and status.state == S.STATE_AWAKE
    assert status.last_restart.source == "standby" and "promote" in status.last_restart.phases
    assert "wake" in status.last_restart.phases and status.last_restart.bytes == status.weight_bytes

    second = wait_for_standby(daemon, not_in=(first, spare))  # a new spare replaces the one taken
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1))
    assert daemon.status().standby_pid == second  # level 1 keeps it
    os.kill(spare, signal.SIGKILL)  # asleep: the spare takes over asleep; the next request wakes it
    deadline = time.monotonic() + 60
    while ((status := daemon.status()).worker_pid, status.state) != (second, S.STATE_ASLEEP) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.worker_pid == second and status.state == S.STATE_ASLEEP and status.restarts == 2
    assert "wake" not in status.last_restart.phases
    reply = daemon.generate()
    assert [r.token.id for r in reply] == baseline and reply[-1].summary.woke


def test_the_standby_stops_at_level3_and_returns_after_the_wake(start_daemon):  # noqa: F811
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0", "--standby")
    baseline = daemon.ids()
    spare = wait_for_standby(daemon)
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=3))
    status = daemon.status()
    assert status.worker_pid == 0 and status.standby_pid == 0 and gone(spare)
    assert daemon.ids() == baseline
    assert psutil.pid_exists(wait_for_standby(daemon, not_in=(spare,)))  # the wake starts a new one


def test_a_spare_that_dies_with_the_worker_gives_way_to_a_spawned_worker(start_daemon):  # noqa: F811
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0", "--standby")
    baseline = daemon.ids()
    first, spare = daemon.status().worker_pid, wait_for_standby(daemon)
    os.kill(first, signal.SIGKILL)
    os.kill(spare, signal.SIGKILL)
    assert daemon.ids() == baseline  # waits for whichever restart happens
    status = daemon.status()
    assert status.worker_pid not in (0, first, spare) and status.state == S.STATE_AWAKE
    assert status.last_restart.source == "spawn"
    assert psutil.pid_exists(wait_for_standby(daemon, not_in=(first, spare)))


def test_no_spare_starts_while_the_model_sleeps_deeper_than_level1(start_daemon):  # noqa: F811
    daemon = start_daemon("synthetic:tiny", "--idle-timeout", "0", "--standby")
    baseline = daemon.ids()
    spare = wait_for_standby(daemon)
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=2))
    first = daemon.status().worker_pid
    assert daemon.status().standby_pid == 0 and gone(spare)
    os.kill(first, signal.SIGKILL)  # restarted asleep
    deadline = time.monotonic() + 60
    while (status := daemon.status()).worker_pid in (0, first) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.state == S.STATE_ASLEEP and status.sleep_level == 2 and status.restarts == 1
    assert status.worker_load_source == "none" and status.pool_bytes == 0  # level 2 holds no pool, restarted too
    time.sleep(1.0)
    status = daemon.status()
    assert status.standby_pid == 0 and status.state == S.STATE_ASLEEP
    assert daemon.ids() == baseline
    assert psutil.pid_exists(wait_for_standby(daemon, not_in=(spare,)))
