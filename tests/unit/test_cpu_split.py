"""CPU vLLM agents on one host each get their own cores (omni_rpc.launchers.cpus)."""

from __future__ import annotations

import pytest

from omni_rpc.launchers import cpus
from omni_rpc.launchers.local import LocalCluster


def test_cores_split_into_contiguous_disjoint_groups() -> None:
    assert cpus.split_cores([0, 1], 2) == [[0], [1]]
    assert cpus.split_cores([0, 1], 1) == [[0, 1]]
    assert cpus.split_cores(range(8), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Sizes differ by at most one; the first groups take the extra cores.
    assert cpus.split_cores(range(7), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    # The cores this process may use, not 0..n-1.
    assert cpus.split_cores([2, 3, 6, 7], 2) == [[2, 3], [6, 7]]
    for n in range(1, 17):
        groups = cpus.split_cores(range(16), n)
        assert sorted(c for g in groups for c in g) == list(range(16))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_more_agents_than_cores_share_them_with_a_warning() -> None:
    with pytest.warns(RuntimeWarning, match="3 CPU vLLM agents on 2 core"):
        assert cpus.split_cores([0, 1], 3) == [[0], [1], [0]]
    with pytest.raises(ValueError):
        cpus.split_cores([0, 1], 0)


def test_core_lists_use_the_agents_syntax() -> None:
    assert cpus.format_cores([0, 1, 2, 3]) == "0-3"
    assert cpus.format_cores([0, 2]) == "0,2"
    assert cpus.format_cores([1]) == "1"
    assert cpus.format_cores([0, 1]) == "0,1"
    assert cpus.format_cores([0, 1, 2, 5, 7, 8, 9]) == "0-2,5,7-9"
    assert cpus.agent_core_lists(2, [0, 1, 2, 3]) == ["0,1", "2,3"]


def test_the_local_launcher_binds_only_cpu_vllm_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "usable_cpus", lambda: [0, 1, 2, 3])
    assert LocalCluster(num_nodes=2, engine="vllm").plan_cpu_cores() == ["0,1", "2,3"]
    assert LocalCluster(num_nodes=4, engine="vllm").plan_cpu_cores() == ["0", "1", "2", "3"]
    # The old path (vLLM's own binding), GPU agents, simulated agents: no --cpu-cores.
    assert LocalCluster(num_nodes=2, engine="vllm", cpu_cores="none").plan_cpu_cores() == []
    assert LocalCluster(num_nodes=2, engine="vllm", gpus=[0, 1]).plan_cpu_cores() == []
    assert LocalCluster(num_nodes=2, engine="sim").plan_cpu_cores() == []
    # Cores the caller chose are left alone.
    given = LocalCluster(num_nodes=2, engine="vllm", agent_args=["--cpu-cores", "3"])
    assert given.plan_cpu_cores() == []
    with pytest.raises(ValueError, match="cpu_cores must be one of auto, none"):
        LocalCluster(cpu_cores="half")
