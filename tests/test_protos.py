"""The committed generated code must match the protos (``make proto`` regenerates it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
    assert methods(node_agent_pb2, "NodeAgent") == {"Generate", "GetLoad"}
    assert coordinator_pb2.DESCRIPTOR.package == "omni.v1"
