"""One agent per GPU on one machine: detection, assignment, refusal, and what nodes report.

The GPUs come from a stand-in ``nvidia-smi`` on PATH (these machines have none); the agents
are real processes that set their own CUDA_VISIBLE_DEVICES from ``--gpu``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from omni_rpc import DistributedOrchestrator
from omni_rpc.launchers.gpus import PlacementError, assign, parse_gpus, visible_gpus
from tests.test_cli import free_port, omni, omni_up_running, wait_healthy_nodes

FAKE_SMI = """#!/bin/sh
[ "$1" = "-L" ] || exit 9
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)"
"""


@pytest.fixture
def two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield


def test_detection_reads_nvidia_smi_or_cuda_visible_devices(
    two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert visible_gpus() == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert visible_gpus() == [3, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb,GPU-cccc")
    assert visible_gpus() == [0, 1, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_assignment_one_agent_per_gpu(two_gpus: None) -> None:
    assert assign(2, "vllm") == [0, 1]
    assert assign(1, "vllm") == [0]
    assert assign(5, "sim") is None  # auto: simulated agents stay on the CPU
    assert assign(2, "sim", "all") == [0, 1]
    assert assign(2, "vllm", "none") is None
    assert assign(2, "sim", "1,0") == [1, 0]
    with pytest.raises(PlacementError, match="3 nodes requested but this machine has 2 GPU"):
        assign(3, "vllm")
    with pytest.raises(PlacementError, match="distinct"):
        parse_gpus("1,1")
    with pytest.raises(PlacementError, match="auto, all, none"):
        parse_gpus("two")


def test_cpu_host_runs_cpu_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert assign(4, "vllm") is None


def test_sdk_places_agents_on_distinct_gpus(two_gpus: None) -> None:
    with DistributedOrchestrator(
        num_nodes=2, gpus="all", agent_args=["--sim-ttft-ms", "1", "--sim-itl-ms", "1"]
    ) as orchestrator:
        stats = orchestrator.get_stats()
        nodes = stats["health_stats"]
        assert {n["visible_devices"] for n in nodes.values()} == {"0", "1"}
        assert {n["gpu"] for n in nodes.values()} == {0, 1}
        assert {n["launcher"] for n in nodes.values()} == {"local"}
        assert len(asyncio.run(orchestrator.generate(["a", "b"], max_tokens=3))) == 2
    with pytest.raises(PlacementError, match="3 nodes requested"):
        DistributedOrchestrator(num_nodes=3, gpus="all")


def test_omni_up_refuses_more_nodes_than_gpus(two_gpus: None) -> None:
    result = omni("up", "--nodes", "3", "--gpus", "all", "--listen", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "3 nodes requested but this machine has 2 GPU(s)" in result.stderr


def test_omni_up_one_agent_per_gpu(two_gpus: None) -> None:
    address = f"127.0.0.1:{free_port()}"
    with omni_up_running("--nodes", "2", "--gpus", "all", "--listen", address) as process:
        nodes = wait_healthy_nodes(process, address, 2, 60)
        assert sorted(str(n["visible_devices"]) for n in nodes) == ["0", "1"]
        assert {n["launcher"] for n in nodes} == {"local"}
    out, _ = process.communicate()
    assert "gpu 0" in out and "gpu 1" in out
