"""Supervisor pieces that need no daemon: configuration, memory parsing, the error mapping."""
import subprocess
from pathlib import Path
import sys

import grpc
import pytest

from ksleep.supervisor.config import DaemonConfig
from ksleep.supervisor.monitor import parse_smi_json
from ksleep.worker.errors import AsleepError, DeviceMemoryError, PoolCapacityError, ValidationError
from ksleep.worker.interceptor import status_for


def test_flags_beat_environment_beat_toml_beat_defaults(tmp_path):
    toml = tmp_path / "ksleep.toml"
    toml.write_text('model = "synthetic:tiny"\nidle_timeout = 60\nsleep_level = 2\nkeep_pool = true\n')
    config = DaemonConfig.load({"idle_timeout": 5.0}, {"KSLEEP_SLEEP_LEVEL": "3"}, str(toml))
    assert (config.model, config.idle_timeout, config.sleep_level, config.keep_pool) == ("synthetic:tiny", 5.0, 3, True)
    assert config.device == "auto" and config.listen.endswith("ksleepd.sock")


def test_verify_wakes_and_standby_reach_the_worker_settings(tmp_path):
    from ksleep.worker.config import WorkerConfig

    default = DaemonConfig().worker_settings(tmp_path / "w.sock", False)
    assert WorkerConfig.from_pb(default).verify_on_wake and not default.standby
    config = DaemonConfig.load({"verify_wakes": False}, environ={"KSLEEP_STANDBY": "1"})
    assert config.standby and not config.verify_wakes
    off = config.worker_settings(tmp_path / "w.sock", False, standby=True)
    assert not WorkerConfig.from_pb(off).verify_on_wake and off.standby


@pytest.mark.parametrize("bad", [{"sleep_level": 4}, {"device": "tpu"}, {"idle_timeout": -1}, {"listen": "nowhere"},
                                 {"listen": "localhost:99999"}, {"log_level": "loud"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        DaemonConfig(**bad)


def test_bad_environment_and_unknown_toml_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="KSLEEP_IDLE_TIMEOUT='soon' is not a valid float"):
        DaemonConfig.load({}, {"KSLEEP_IDLE_TIMEOUT": "soon"})
    toml = tmp_path / "k.toml"
    toml.write_text("idle_timout = 3\n")
    with pytest.raises(ValueError, match="unknown key\\(s\\) in .*: idle_timout"):
        DaemonConfig.load({}, {}, str(toml))


def test_help_documents_every_setting_and_its_environment_variable():
    out = subprocess.run([sys.executable, "-m", "ksleep.supervisor", "start", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("model", "device", "dtype", "listen", "idle-timeout", "sleep-level", "keep-layers", "log-level", "keep-pool"):
        assert f"--{name}" in out and f"KSLEEP_{name.upper().replace('-', '_')}" in out.replace("\n", "").replace(" ", "")


def test_bad_flag_value_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "ksleep.supervisor", "start", "--sleep-level", "9"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "sleep_level must be 1, 2 or 3" in proc.stderr


def test_rocm_smi_and_hy_smi_json_are_read():
    text = '{"card0": {"VRAM Total Memory (B)": "68702699520", "VRAM Total Used Memory (B)": "1234567"}}'
    memory = parse_smi_json(text, 0)
    assert (memory.used, memory.total, memory.process) == (1234567, 68702699520, None)


@pytest.mark.parametrize("exc, code", [
    (ValidationError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError("a bug deep inside"), grpc.StatusCode.INTERNAL),  # not the client's fault
    (TypeError("another bug"), grpc.StatusCode.INTERNAL),
    (AsleepError("asleep"), grpc.StatusCode.FAILED_PRECONDITION),
    (DeviceMemoryError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PoolCapacityError("shm"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
])
def test_exceptions_map_to_status_codes(exc, code):
    assert status_for(exc)[0] == code


def test_finish_reasons_and_states_have_one_name_each_way():
    from ksleep.v1 import common_pb2
    from ksleep.worker.names import FINISH_TO_PB, STATES, finish_name, state_name

    assert all(finish_name(pb) == name for name, pb in FINISH_TO_PB.items())
    assert set(FINISH_TO_PB.values()) == set(common_pb2.FinishReason.values())  # every wire value is named
    assert state_name(common_pb2.STATE_AWAKE) == "awake" and "asleep" in STATES and "unspecified" not in STATES


def test_stopping_a_worker_also_ends_the_processes_it_started():
    import asyncio
    import subprocess
    import time

    import psutil

    from ksleep.supervisor.launcher import WorkerHandle

    async def run():
        # a "worker" whose child would outlive it: bash dies of SIGTERM, its sleep would be orphaned
        proc = subprocess.Popen(["bash", "-c", "sleep 3600 & wait"])
        deadline = time.monotonic() + 10
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        (child,) = psutil.Process(proc.pid).children()
        exited = asyncio.get_running_loop().create_future()
        handle = WorkerHandle(proc.pid, Path("/nonexistent/worker.sock"), exited)
        asyncio.get_running_loop().run_in_executor(None, lambda: exited.get_loop().call_soon_threadsafe(
            exited.set_result, proc.wait()))
        await asyncio.wait_for(handle.stop(grace=5), 20)
        return child

    child = asyncio.run(run())
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
