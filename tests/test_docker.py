"""docker/: no engine runs here, so the files are parsed and everything they reference is checked."""
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ksleep.supervisor.config import DaemonConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
KNOWN_ENV = {f"KSLEEP_{f.name.upper()}" for f in dataclasses.fields(DaemonConfig)} | {"KSLEEP_CACHE_DIR", "KSLEEP_MODEL_DIR"}


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.mark.parametrize("name", ["Dockerfile.cuda", "Dockerfile.dcu"])
def test_dockerfiles_copy_what_exists_and_keep_the_image_torch(name):
    text = (DOCKER / name).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M) and "FROM ${BASE_IMAGE}" in text
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{name} copies {path}, which is not in the repository"
    assert "-c /tmp/keep-torch.txt" in text, "the image's torch must be pinned while installing"
    assert 'ENTRYPOINT ["ksleepd", "start"]' in text and "HEALTHCHECK" in text
    for var in re.findall(r"\b(KSLEEP_[A-Z_]+)=", text):
        assert var in KNOWN_ENV, f"{name} sets {var}, which ksleepd does not read"


def test_compose_has_both_profiles_with_the_devices_and_shared_memory(compose):
    services = compose["services"]
    assert services["ksleepd-cuda"]["profiles"] == ["cuda"] and services["ksleepd-dcu"]["profiles"] == ["dcu"]
    dcu = services["ksleepd-dcu"]
    assert {"/dev/kfd", "/dev/mkfd", "/dev/dri"} <= set(dcu["devices"])
    assert "video" in dcu["group_add"] and any(v.startswith("/opt/hyhal:/opt/hyhal") for v in dcu["volumes"])
    for name, service in services.items():
        assert service.get("ipc") == "host" or service.get("shm_size"), f"{name}: /dev/shm too small for the pool"
        assert (ROOT / service["build"]["dockerfile"]).exists() and (DOCKER / service["build"]["context"]).resolve() == ROOT
        assert {"127.0.0.1:50051:50051", "127.0.0.1:8000:8000"} <= set(service["ports"])
        assert "ksleepctl" in service["healthcheck"]["test"] or "grpc_health_probe" in str(service["healthcheck"]["test"])
        assert any(v.startswith("models:") for v in service["volumes"]), f"{name}: no volume for the model cache"
        for var in service["environment"]:
            assert var in KNOWN_ENV, f"{name} sets {var}, which ksleepd does not read"
    assert "/dev/shm" in (DOCKER / "compose.yaml").read_text()  # said loudly in the file


@pytest.mark.skipif(not (shutil.which("docker-compose") or shutil.which("docker")), reason="no compose client")
def test_compose_config_validates():
    for profile in ("cuda", "dcu"):
        cmd = (["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"])
        proc = subprocess.run([*cmd, "-f", str(DOCKER / "compose.yaml"), "--profile", profile, "config"],
                              capture_output=True, text=True)
        if proc.returncode != 0 and ("unknown command" in proc.stderr or "unknown shorthand flag" in proc.stderr):
            pytest.skip("docker has no compose plugin here")
        assert proc.returncode == 0, proc.stderr
