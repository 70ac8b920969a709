"""The committed generated code must match the protos (``make proto`` regenerates it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
GEN = [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"]


def test_committed_generated_code_is_current() -> None:
    done = subprocess.run(GEN, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_stale_generated_code_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "v1"
    shutil.copytree(ROOT / "omni_rpc" / "v1", copy)
    stub = copy / "coordinator_pb2.pyi"
    stub.write_text(stub.read_text().replace("num_nodes", "node_count"))
    done = subprocess.run([*GEN, "--out", str(copy)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "coordinator_pb2.pyi" in done.stderr and "make proto" in done.stderr


def test_every_contract_service_and_method_is_generated() -> None:
    from omni_rpc.v1 import coordinator_pb2, node_agent_pb2, registry_pb2

    def methods(module: object, service: str) -> set[str]:
        descriptor = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
        return {m.name for m in descriptor.methods}

    assert methods(coordinator_pb2, "Coordinator") == {
        "Generate",
        "GetStats",
        "ListNodes",
        "DrainNode",
    }
    assert methods(registry_pb2, "Registry") == {"Join", "Leave"}
    assert methods(node_agent_pb2, "NodeAgent") == {"Generate", "GetLoad", "Session"}
    assert coordinator_pb2.DESCRIPTOR.package == "omni.v1"


PUBLIC = {"omni/v1/coordinator.proto", "omni/v1/generate.proto", "omni/v1/node.proto"}


def test_public_protos_import_nothing_internal() -> None:
    """Clients get coordinator.proto and what it imports: none of the agents' internal
    services (node_agent.proto, registry.proto) may come along."""
    from omni_rpc.v1 import coordinator_pb2

    seen, todo = set(), [coordinator_pb2.DESCRIPTOR]
    while todo:
        file = todo.pop()
        if file.name not in seen:
            seen.add(file.name)
            todo.extend(file.dependencies)
    assert seen == PUBLIC


def test_moved_messages_keep_their_names_and_numbers() -> None:
    """NodeLoad, GpuInfo and Placement moved to node.proto within omni.v1: the full names
    (what reflection and grpcurl show) and the field numbers are unchanged."""
    from omni_rpc.v1 import node_agent_pb2, node_pb2

    def fields(message: type) -> dict[str, int]:
        descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
        return {f.name: f.number for f in descriptor.fields}

    assert node_pb2.NodeLoad.DESCRIPTOR.full_name == "omni.v1.NodeLoad"
    assert node_pb2.GpuInfo.DESCRIPTOR.full_name == "omni.v1.GpuInfo"
    assert node_pb2.Placement.DESCRIPTOR.full_name == "omni.v1.Placement"
    assert fields(node_pb2.GpuInfo) == {
        "index": 1,
        "name": 2,
        "memory_bytes": 3,
        "visible_devices": 4,
    }
    assert fields(node_pb2.Placement) == {"launcher": 1, "host": 2, "labels": 3}
    assert fields(node_pb2.NodeLoad)["rejected"] == 13 and len(fields(node_pb2.NodeLoad)) == 16
    assert fields(node_pb2.NodeLoad)["requests"] == 14
    assert fields(node_pb2.NodeLoad)["cached_prompt_tokens"] == 16
    # Resume moved to generate.proto (GenerateRequest.resume, public) within omni.v1: the same
    # full name and numbers on the agents' AgentRequest.resume.
    from omni_rpc.v1 import generate_pb2

    assert generate_pb2.Resume.DESCRIPTOR.full_name == "omni.v1.Resume"
    assert fields(generate_pb2.Resume) == {"token_ids": 1, "text": 2, "media_items_delivered": 3}
    assert fields(generate_pb2.GenerateRequest)["resume"] == 12
    resume_type = node_agent_pb2.AgentRequest.DESCRIPTOR.fields_by_name["resume"].message_type
    assert resume_type is generate_pb2.Resume.DESCRIPTOR
    assert fields(node_agent_pb2.SessionResponse) == {"outputs": 1, "load": 2}
    # The removed Cancel control message: its number and name stay reserved.
    assert fields(node_agent_pb2.AgentRequest) == {"generate": 1, "attempt": 3, "resume": 4}
    assert "Cancel" not in node_agent_pb2.DESCRIPTOR.message_types_by_name
    proto = descriptor_pb2.DescriptorProto()
    node_agent_pb2.AgentRequest.DESCRIPTOR.CopyToProto(proto)
    assert [(r.start, r.end) for r in proto.reserved_range] == [(2, 3)]
    assert list(proto.reserved_name) == ["cancel"]


def test_protos_and_buf_config_stand_alone() -> None:
    """Comments in the contract do not send readers to files outside the repository."""
    texts = [p.read_text() for p in (ROOT / "protos" / "omni" / "v1").glob("*.proto")]
    texts.append((ROOT / "buf.yaml").read_text())
    for text in texts:
        for outside in ("DESIGN.md", "../"):
            assert outside not in text
