"""The Kubernetes manifests (deploy/k8s): rendered as kustomize does, validated against the Kubernetes schemas
(kubernetes-validate), and checked against what ksleepd reads and serves. No cluster needed."""
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from ksleep.supervisor.config import DaemonConfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES = "1.33"  # the schema version the manifests are validated against
VARIANTS = ["base", "dcu", "keda"]


def merge(base, patch):
    """A strategic merge patch, as far as these manifests use it: maps merge, null deletes, lists of named items
    merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in base + patch):
        named = {item["name"]: item for item in base}
        for item in patch:
            named[item["name"]] = merge(named[item["name"]], item) if item["name"] in named else item
        return list(named.values())
    return patch


def render(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in kustomization.get("patches", []):
        change = yaml.safe_load((folder / patch["path"]).read_text())
        targets = [d for d in docs if d["kind"] == change["kind"] and d["metadata"]["name"] == change["metadata"]["name"]]
        assert targets, f"{patch['path']} patches nothing"
        for target in targets:
            docs[docs.index(target)] = merge(target, change)
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return docs


def containers(docs):
    return [c for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_renders_and_validates_against_the_kubernetes_schemas(variant):
    docs = render(K8S / variant)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Secret", "PersistentVolumeClaim"}
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked below
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises naming the bad field


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_manifests_set_only_variables_ksleepd_reads_and_probe_its_routes(variant):
    from ksleep.supervisor.http import build_app
    from ksleep.supervisor.registry import ModelRegistry
    from ksleep.supervisor.server import KsleepService

    docs = render(K8S / variant)
    known = {f"KSLEEP_{f.name.upper()}" for f in fields(DaemonConfig) if f.metadata.get("flag", True)} | {"KSLEEP_CONFIG"}
    (container,) = containers(docs)
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= known, f"unknown to ksleepd: {sorted(set(env) - known)}"
    settings = {k: e["value"] for k, e in env.items() if "value" in e}
    config = DaemonConfig.load({}, environ=settings)  # the values parse and validate
    assert env["KSLEEP_CONTROL_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ksleep-control"
    models = ModelRegistry.from_config(config)  # (nothing starts: no process, no socket)
    routes = {r.path for r in build_app(config, KsleepService(models, models.metrics)).routes}
    probes = {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes <= routes and container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {config.http_address[1], int(config.listen.rsplit(":", 1)[1])}
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout + config.grace
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
    assert shm["medium"] == "Memory" and int(shm["sizeLimit"].removesuffix("Gi")) * 2**30 > 15.3e9  # the 7B's pool
    if variant == "dcu":
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/dev/kfd", "/dev/dri", "/opt/hyhal"}
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_the_keda_example_scales_the_deployment_from_zero_on_ksleep_metrics():
    docs = render(K8S / "keda")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and "ksleep_in_flight_requests" in trigger["metadata"]["query"]
