"""LocalCluster with several coordinators: each its own process, address and registry, every
agent joined to all of them; one killed and restarted comes back on its address."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from omni_rpc import config
from omni_rpc.launchers import ClusterPlan, plan_cluster
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from tests.conftest import FAST_SIM, wait_until


def node_states(address: str) -> dict[str, int]:
    """Each node's state at the coordinator at ``address`` (empty when it does not answer)."""
    client = CoordinatorClient(address, timeout_s=2.0)
    try:
        return {n.node_id: n.state for n in client.nodes()}
    except Exception:
        return {}
    finally:
        client.close()


def healthy_at(address: str) -> set[str]:
    client = CoordinatorClient(address, timeout_s=2.0)
    try:
        return set(client.stats().healthy_nodes)
    except Exception:
        return set()
    finally:
        client.close()


def all_healthy_at(address: str, nodes: set[str]) -> Callable[[], bool]:
    return lambda: healthy_at(address) >= nodes


# -- without processes --------------------------------------------------------------------


def test_agents_join_every_coordinator_on_their_command_line() -> None:
    cluster = LocalCluster(num_nodes=2, num_coordinators=2)
    cluster.coordinator_addresses = ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert cluster.coordinator_target == "127.0.0.1:7001,127.0.0.1:7002"
    argv = cluster.agent_argv(1, extra=["--x"])
    at = argv.index("--coordinator")
    assert argv[at + 1] == "127.0.0.1:7001,127.0.0.1:7002"
    assert argv[:2] == ["-m", "node_agent"]
    assert argv[argv.index("--node-id") + 1] == "node-1"
    assert argv[-1] == "--x"


def test_one_coordinator_command_line_is_unchanged() -> None:
    cluster = LocalCluster(num_nodes=1)
    assert cluster.num_coordinators == 1
    cluster.coordinator_addresses = ["127.0.0.1:7001"]
    cluster.coordinator_address = "127.0.0.1:7001"
    assert cluster.coordinator_target == "127.0.0.1:7001"
    argv = cluster.agent_argv(0)
    assert argv[argv.index("--coordinator") + 1] == "127.0.0.1:7001"
    # An address given without starting a coordinator (agents pointed elsewhere) still counts.
    given = LocalCluster(num_nodes=1, coordinator_address="10.0.0.1:5")
    assert given.coordinator_target == "10.0.0.1:5"
    assert given.agent_argv(0)[given.agent_argv(0).index("--coordinator") + 1] == "10.0.0.1:5"


def test_coordinator_ports_fixed_or_free() -> None:
    fixed = LocalCluster(num_coordinators=3, coordinator_listen="127.0.0.1:6000")
    assert [fixed.coordinator_listen_for(i) for i in range(3)] == [
        "127.0.0.1:6000",
        "127.0.0.1:6001",
        "127.0.0.1:6002",
    ]
    free = LocalCluster(num_coordinators=2, http_listen="127.0.0.1:0")
    assert free.coordinator_listen_for(1) == "127.0.0.1:0"
    assert free.http_listen_for(1) == "127.0.0.1:0"
    assert LocalCluster(num_coordinators=2).http_listen_for(1) is None
    with pytest.raises(ValueError):
        LocalCluster(num_coordinators=0)


def test_cluster_plan_passes_the_number_of_coordinators() -> None:
    plan = ClusterPlan(
        num_nodes=1,
        strategy=config.DEFAULT_STRATEGY,
        health_check_interval=1.0,
        max_retries=1,
        engine="sim",
        model="sim",
        coordinators=3,
    )
    assert plan_cluster(plan).processes.num_coordinators == 3
    plan.coordinators = 0
    with pytest.raises(ValueError):
        plan_cluster(plan)


# -- with processes -----------------------------------------------------------------------


@pytest.fixture
def two_coordinators(tmp_path: Path) -> Iterator[tuple[LocalCluster, str]]:
    cluster = LocalCluster(
        num_nodes=2,
        num_coordinators=2,
        agent_args=FAST_SIM,
        health_check_interval=0.5,
        http_listen="127.0.0.1:0",
        log_dir=tmp_path,
    )
    try:
        target = cluster.start()
        yield cluster, target
    finally:
        cluster.stop()


def test_two_coordinators_each_see_every_agent(
    two_coordinators: tuple[LocalCluster, str],
) -> None:
    cluster, target = two_coordinators
    first, second = cluster.coordinator_addresses
    assert first != second
    assert target == cluster.coordinator_target == f"{first},{second}"
    # The first coordinator is still the one the single-coordinator fields name.
    assert cluster.coordinator is cluster.coordinators[0]
    assert cluster.coordinator_address == first
    assert len(cluster.http_addresses) == 2 and len(set(cluster.http_addresses)) == 2
    assert cluster.http_address == cluster.http_addresses[0]
    assert cluster.http_url == cluster.http_urls[0]
    assert cluster.log_dir is not None
    assert cluster.coordinators[1].log_path == cluster.log_dir / "coordinator-1.log"
    assert cluster.coordinators[0].log_path == cluster.log_dir / "coordinator.log"
    nodes = {"node-0", "node-1"}
    for address in cluster.coordinator_addresses:
        wait_until(all_healthy_at(address, nodes), 60, f"both agents at {address}")
        assert set(node_states(address)) == nodes
    cluster.check_alive()

    # Coordinator 1 killed: coordinator 0 keeps serving; restarted on the same address, the
    # agents join it again.
    killed = cluster.kill_coordinator(1)
    assert not killed.alive and killed.process.returncode == -signal.SIGKILL
    assert healthy_at(first) >= nodes
    cluster.restart_coordinator(index=1)
    assert cluster.coordinator_addresses == [first, second]
    assert cluster.coordinators[1] is not killed and cluster.coordinators[1].alive
    wait_until(all_healthy_at(second, nodes), 60, "both agents back at coordinator 1")
    assert cluster.coordinator_target == target
    cluster.check_alive()
