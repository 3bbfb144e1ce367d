"""The wire contract: generated code in step with proto/, and importable on the GPU image's grpc/protobuf."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = sorted((PROTO_DIR / "ksleep" / "v1").glob("*.proto"))


def test_generated_code_is_not_stale(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", *map(str, PROTOS)]
    assert protoc.main(args) == 0
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    stale = [str(rel) for rel in generated if (PROTO_DIR / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"run `make proto`: these differ from their .proto: {stale}"


def test_generated_code_needs_no_newer_grpc_than_the_gpu_image():
    for path in (PROTO_DIR / "ksleep" / "v1").glob("*_pb2_grpc.py"):
        assert "GRPC_GENERATED_VERSION = '1.84.0'" in path.read_text(), path.name
    for path in (PROTO_DIR / "ksleep" / "v1").glob("*_pb2.py"):
        text = path.read_text()
        assert "Domain.PUBLIC,\n    7,\n    35," in text, f"{path.name} needs a protobuf newer than 7.35"


def test_every_enum_value_is_prefixed_and_every_rpc_has_its_own_messages():
    from ksleep.v1 import common_pb2, ksleep_pb2, worker_pb2

    for module in (common_pb2, ksleep_pb2, worker_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = "".join("_" + c if c.isupper() else c for c in enum.name).lstrip("_").upper() + "_"
            assert all(v.name.startswith(prefix) for v in enum.values), enum.name
        for service in module.DESCRIPTOR.services_by_name.values():
            inputs = [m.input_type.name for m in service.methods]
            outputs = [m.output_type.name for m in service.methods]
            assert len(set(inputs)) == len(inputs) and len(set(outputs)) == len(outputs), service.name
            assert all(i.endswith("Request") and o.endswith("Response") for i, o in zip(inputs, outputs))
