"""UpdateWeights: new weights from a checkpoint directory, in the engine and through the daemon (CPU)."""
import threading
from pathlib import Path

import grpc
import pytest
from safetensors.torch import save_file

from ksleep.v1 import common_pb2, ksleep_pb2
from ksleep.worker import Engine, SamplingParams
from ksleep.worker.errors import ValidationError

from .conftest import PROMPT, SHM
from .daemon import Daemon, request


def write_checkpoint(make_config, directory: Path, seed: int, damage: str | None = None) -> Path:
    """synthetic:tiny drawn with `seed`, saved as a Hugging Face directory; `damage` breaks one tensor."""
    engine = Engine.load(make_config(seed=seed, pool_format="raw"))
    try:
        params = {s.name: s.view(engine.weights.pool.tensor).clone() for s in engine.layout.slots if s.kind == "param"}
        if damage == "shape":
            params["model.layers.0.mlp.up_proj.weight"] = params["model.layers.0.mlp.up_proj.weight"][:-1]
        elif damage == "missing":
            del params["lm_head.weight"]
        directory.mkdir(parents=True)
        save_file(params, str(directory / "model.safetensors"), metadata={"format": "pt"})
        engine.skeleton.config.save_pretrained(directory)
        engine.tokenizer.save_pretrained(directory)
    finally:
        engine.close(remove_pool=True)
    return directory


def ids(engine: Engine) -> list[int]:
    return engine.complete(PROMPT, SamplingParams(max_tokens=10)).token_ids


@pytest.fixture
def checkpoint(make_config, tmp_path):
    return lambda seed, damage=None: write_checkpoint(make_config, tmp_path / f"ckpt-{seed}-{damage}", seed, damage)


@pytest.mark.parametrize("pool_format", ["raw", "compressed"])
def test_an_update_gives_the_tokens_of_an_engine_started_on_the_checkpoint(open_engine, checkpoint, prefix, pool_format):
    directory = checkpoint(1)
    expected = ids(open_engine(str(directory), pool_format=pool_format))
    engine = open_engine(pool_format=pool_format)
    before, old_pool = ids(engine), engine.pool_name
    assert before != expected
    result = engine.update_weights(str(directory))
    assert result.version.number == 1 and result.pool == "attached"  # the fresh engine above built that pool
    assert ids(engine) == expected
    assert not (SHM / f"{old_pool}.pool").exists()  # the old pool is removed once nothing uses it
    engine.sleep(2)  # level 2 drops the pool: the wake reads the checkpoint again
    engine.wake()
    assert ids(engine) == expected and engine.weights_version.number == 1


@pytest.mark.parametrize("damage", ["shape", "missing"])
def test_weights_that_do_not_fit_change_nothing(open_engine, checkpoint, prefix, damage):
    engine = open_engine()
    before, pools = ids(engine), sorted(p.name for p in SHM.glob(f"{prefix}*"))
    with pytest.raises(ValidationError, match="up_proj" if damage == "shape" else "lm_head"):
        engine.update_weights(str(checkpoint(1, damage)))
    with pytest.raises(ValidationError, match="does not exist"):
        engine.update_weights("/nonexistent/checkpoint")
    assert ids(engine) == before and engine.weights_version.number == 0
    assert sorted(p.name for p in SHM.glob(f"{prefix}*")) == pools  # nothing half-created


@pytest.fixture
def start_daemon(tmp_path, prefix):
    daemons = []

    def start(model="synthetic:tiny", *flags):
        folder = tmp_path / f"d{len(daemons)}"
        folder.mkdir()
        daemon = Daemon(folder, prefix, model, "--idle-timeout", "0", *flags)
        daemons.append(daemon)
        return daemon.wait_ready()

    yield start
    for daemon in daemons:
        daemon.stop()


def test_the_daemon_updates_its_weights_and_says_which_produced_each_output(start_daemon, checkpoint):
    first, second = checkpoint(1), checkpoint(2)
    reference = start_daemon(str(first))
    expected = reference.ids()
    reference.stop()
    daemon = start_daemon()
    before = daemon.ids()
    # requests racing with the update: each output is all old or all new weights, and says which
    outputs, errors = [], []

    def client():
        try:
            for _ in range(6):
                responses = daemon.generate()
                outputs.append(([r.token.id for r in responses], responses[-1].summary.weights.number))
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    reply = daemon.stub.UpdateWeights(ksleep_pb2.UpdateWeightsRequest(directory=str(first)), timeout=120)
    for t in threads:
        t.join(120)
    assert not errors and reply.weights.number == 1 and reply.weights.source == str(first)
    assert all(out == (before if version == 0 else expected) for out, version in outputs)
    assert daemon.ids() == expected and daemon.status().weights.number == 1

    with pytest.raises(grpc.RpcError) as refused:
        daemon.stub.UpdateWeights(ksleep_pb2.UpdateWeightsRequest(directory=str(checkpoint(3, "shape"))), timeout=120)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "up_proj" in refused.value.details()
    assert daemon.ids() == expected and daemon.status().weights.number == 1

    # asleep at level 3 (no worker): the update builds the pool; the next wake's new worker serves it
    daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=3), timeout=60)
    reply = daemon.stub.UpdateWeights(ksleep_pb2.UpdateWeightsRequest(directory=str(second)), timeout=120)
    status = daemon.status()
    assert reply.weights.number == 2 and status.state == common_pb2.STATE_ASLEEP and status.worker_pid == 0
    final = daemon.generate()
    assert final[-1].summary.weights.number == 2
    reference = start_daemon(str(second))
    assert [r.token.id for r in final] == reference.ids()


def test_update_weights_needs_the_control_token(start_daemon, checkpoint):
    daemon = start_daemon("synthetic:tiny", "--control-token", "s3cret")
    with pytest.raises(grpc.RpcError) as refused:
        daemon.stub.UpdateWeights(ksleep_pb2.UpdateWeightsRequest(directory=str(checkpoint(1))), timeout=60)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert daemon.status().weights.number == 0


def test_the_http_route_and_ksleepctl_update_the_weights(start_daemon, checkpoint):
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon = start_daemon("synthetic:tiny", "--http", f"127.0.0.1:{port}", "--control-token", "s3cret")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    auth = {"Authorization": "Bearer s3cret"}
    first = str(checkpoint(1))
    assert http.post("/update_weights_from_disk", json={"model_path": first}).status_code == 401
    bad = http.post("/update_weights_from_disk", json={"model_path": "/nonexistent"}, headers=auth)
    assert bad.status_code == 400 and "does not exist" in bad.text
    assert http.post("/update_weights_from_disk", json={"model_path": first, "load_format": "x"}, headers=auth).status_code == 400
    ok = http.post("/update_weights_from_disk", json={"model_path": first}, headers=auth)
    assert ok.status_code == 200 and ok.json()["success"] and ok.json()["weights_version"] == 1
    env = {**os.environ, "KSLEEP_ADDRESS": f"unix:{daemon.socket}", "KSLEEP_CONTROL_TOKEN": "s3cret"}
    done = subprocess.run([sys.executable, "-m", "ksleep.client", "update-weights", str(checkpoint(2))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "version 2" in done.stdout, done.stderr
    assert daemon.status().weights.number == 2


def test_tensors_staged_in_shared_memory_update_the_weights(open_engine, checkpoint, start_daemon):
    from safetensors.torch import load_file

    from ksleep.client import Client, WeightWriter

    directory = checkpoint(1)
    expected = ids(open_engine(str(directory)))
    tensors = load_file(str(directory / "model.safetensors"))  # what a trainer holds in memory
    engine = open_engine()
    with WeightWriter(shard_bytes=1 << 16) as staged:  # several shards
        for name, tensor in tensors.items():
            staged.write(name, tensor)
        folder = staged.commit()
        assert Path(folder).parent == SHM and len(list(Path(folder).glob("*.safetensors"))) > 1
        assert engine.update_weights(folder).version.number == 1
        assert ids(engine) == expected
        daemon = start_daemon()
        with Client(f"unix:{daemon.socket}") as client:
            assert client.update_weights(folder)["weights_version"] == 1
            done = client.complete(PROMPT, max_tokens=10)
            assert done.weights_version == 1 and done.token_ids == expected
    assert not Path(folder).exists()
