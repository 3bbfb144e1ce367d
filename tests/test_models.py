"""Several models in one daemon: routing by name, one awake at a time with --max-awake 1, switching (CPU)."""
import grpc
import pytest

from ksleep.supervisor.config import DaemonConfig
from ksleep.v1 import common_pb2, ksleep_pb2

from .daemon import Daemon, request
from .test_update_weights import write_checkpoint

S = common_pb2


def test_models_tables_and_repeated_flags_configure_each_model(tmp_path):
    path = tmp_path / "ksleepd.toml"
    path.write_text('max_awake = 1\nidle_timeout = 30\n[[models]]\nmodel = "synthetic:tiny"\nkeep_layers = 1\n'
                    '[[models]]\nmodel = "smollm2-135m"\nidle_timeout = 5\nsleep_level = 2\n')
    config = DaemonConfig.load({}, environ={}, toml_path=str(path))
    first, second = config.model_configs()
    assert config.model == "synthetic:tiny" and config.max_awake == 1
    assert (first.keep_layers, first.idle_timeout, second.idle_timeout, second.sleep_level) == (1, 30, 5, 2)
    flags = DaemonConfig.load({"model": ["a/b", "c/d"]}, environ={})
    assert [c.model for c in flags.model_configs()] == ["a/b", "c/d"]
    path.write_text('[[models]]\nmodel = "synthetic:tiny"\nlisten = "unix:/tmp/x"\n')
    with pytest.raises(ValueError, match="listen cannot be set per model"):
        DaemonConfig.load({}, environ={}, toml_path=str(path))
    with pytest.raises(ValueError, match="named twice"):
        DaemonConfig.load({"model": ["synthetic:tiny", "synthetic:tiny"]}, environ={})


@pytest.fixture
def two_models(tmp_path, prefix, make_config):
    other = write_checkpoint(make_config, tmp_path / "other-model", seed=7)
    daemon = Daemon(tmp_path, prefix, "synthetic:tiny", "--model", str(other), "--max-awake", "1",
                    "--idle-timeout", "0").wait_ready()
    yield daemon, str(other)
    daemon.stop()


def awake(status) -> list[str]:
    return [m.model for m in status.models if m.state == S.STATE_AWAKE]


def test_requests_pick_their_model_and_one_is_awake_at_a_time(two_models):
    daemon, other = two_models
    status = daemon.status()
    assert [m.model for m in status.models] == ["synthetic:tiny", other] and len(awake(status)) == 1
    first = {name: daemon.ids(ksleep_pb2.GenerateRequest(prompt=request().prompt, params=request().params, model=name))
             for name in ("synthetic:tiny", other)}
    assert first["synthetic:tiny"] != first[other]
    assert daemon.ids() == first["synthetic:tiny"]  # no model named: the first
    switches = daemon.status().model_switches
    for name in ["synthetic:tiny", other] * 3:  # alternating: every request a switch
        req = request()
        req.model = name
        assert daemon.ids(req) == first[name]
        status = daemon.status()
        assert awake(status) == [name]  # never two awake
    assert daemon.status().model_switches >= switches + 5
    assert all(m.wakes_total >= 3 for m in daemon.status().models)

    unknown = request()
    unknown.model = "no-such-model"
    with pytest.raises(grpc.RpcError) as refused:
        daemon.generate(unknown)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and other in refused.value.details()
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1), timeout=60)  # no model named: every model sleeps
    assert awake(daemon.status()) == []


def test_replicas_share_one_pool_take_the_load_and_scale_out_by_waking(tmp_path, prefix):
    import threading

    from .conftest import SHM

    daemon = Daemon(tmp_path, prefix, "synthetic:tiny", "--replicas", "2", "--scale-out-at", "1",
                    "--idle-timeout", "0").wait_ready()
    try:
        status = daemon.status()
        workers = [m.worker_pid for m in status.models]
        assert len(workers) == 2 and len(set(workers)) == 2 and 0 not in workers
        assert len([p for p in SHM.glob(f"{prefix}*") if p.suffix == ".pool"]) == 1  # one host copy for both
        baseline = daemon.ids()
        daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1), timeout=60)  # both
        assert daemon.ids() == baseline
        assert len(awake(daemon.status())) == 1  # one request: one replica woke
        results, errors = [], []

        def client():
            try:
                results.append(daemon.ids(request(max_tokens=24)))
            except grpc.RpcError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        status = daemon.status()
        assert not errors and len(set(map(tuple, results))) == 1  # the same tokens from either replica
        assert len(awake(status)) == 2 and status.scale_outs >= 1  # under load the sleeping one woke
        assert all(m.wakes_total >= 1 for m in status.models)
    finally:
        assert daemon.stop() == 0
    assert not list(SHM.glob(f"{prefix}*"))  # the last replica to stop removed the pool
