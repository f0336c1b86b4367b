from __future__ import annotations

from pathlib import Path

from capsa.cri.proto import api_pb2 as pb
from capsa.cri.proto.generate import GENERATED, PROTO_DIR, generate


def test_committed_stubs_match_api_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (PROTO_DIR / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit the result"


def test_generated_grpc_module_imports_its_messages_relatively() -> None:
    text = (PROTO_DIR / "api_pb2_grpc.py").read_text()
    assert "from . import api_pb2" in text
    assert "import capsa" not in text and "from capsa" not in text


def test_field_numbers_match_upstream_cri() -> None:
    """A few numbers that capsa depends on, as k8s.io/cri-api runtime/v1 defines them."""

    def number(message: str, field: str) -> int:
        return int(pb.DESCRIPTOR.message_types_by_name[message].fields_by_name[field].number)

    assert pb.DESCRIPTOR.package == "runtime.v1"
    assert number("PodSandboxConfig", "linux") == 8
    assert number("ContainerConfig", "linux") == 15
    assert number("ContainerStatus", "log_path") == 15
    assert number("ImageSpec", "user_specified_image") == 18
    assert number("LinuxSandboxSecurityContext", "run_as_group") == 8
    assert number("LinuxContainerSecurityContext", "run_as_group") == 12
    assert number("UpdateContainerResourcesRequest", "annotations") == 4
