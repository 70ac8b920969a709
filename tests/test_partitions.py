"""Network partitions between the coordinator and an agent (a network namespace cut off with
iptables; see tests/netns.py): re-admission soon after the heal, and an agent that stops
generating for a coordinator it can no longer reach. Skipped where the machine cannot make
namespaces (not root, no iproute2/iptables), with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests import netns
from tests.conftest import FAST_SIM, record, start_sim_agent, wait_until

MakeCluster = Callable[..., LocalCluster]

UNAVAILABLE = netns.unavailable()
pytestmark = pytest.mark.skipif(bool(UNAVAILABLE), reason=UNAVAILABLE)

# Long enough for the coordinator's connection to the agent to be torn down by keepalive and
# redialed through the partition. (gRPC's default backoff, attempts given 20 s each, often
# still reconnects quickly after 30 s, by the luck of its SYN schedule; after 120 s it took
# 10.5 s: the 120 s variant runs in `make chaos`.)
PARTITION_S = 30.0


@pytest.fixture
def namespace() -> Iterator[netns.Namespace]:
    ns = netns.Namespace()
    yield ns
    ns.close()


@pytest.fixture
def remote_agent(
    namespace: netns.Namespace,
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start an agent inside the namespace, joined to ``cluster`` over the veth pair."""
    started: list[subprocess.Popen[bytes]] = []

    def start(cluster: LocalCluster, *extra: str) -> subprocess.Popen[bytes]:
        assert cluster.log_dir is not None
        port = cluster.coordinator_address.rsplit(":", 1)[1]
        agent = start_sim_agent(
            cluster.log_dir / "remote.log",
            f"{namespace.host_ip}:{port}",
            f"{namespace.inner_ip}:0",
            "remote",
            *extra,
            prefix=namespace.command([]),
        )
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()
        agent.wait()


def state(cluster: LocalCluster, node_id: str) -> str:
    client = CoordinatorClient(cluster.coordinator_address)
    try:
        for node in client.nodes():
            if node.node_id == node_id:
                return coordinator_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_")
        return "ABSENT"
    finally:
        client.close()


def partitioned_readmit(
    make_cluster: MakeCluster,
    namespace: netns.Namespace,
    remote_agent: Callable[..., subprocess.Popen[bytes]],
    partition_s: float,
) -> float:
    """Partition an agent from the coordinator for ``partition_s``; return how long after the
    heal it was HEALTHY again (asserted within a bound)."""
    cluster = make_cluster(
        1, coordinator_listen="0.0.0.0:0", coordinator_args=["--health-check-timeout", "0.5"]
    )
    remote_agent(cluster, *FAST_SIM)
    wait_until(lambda: state(cluster, "remote") == "HEALTHY", 30, "remote healthy")

    namespace.cut()
    cut_at = time.monotonic()
    wait_until(lambda: state(cluster, "remote") == "UNHEALTHY", 10, "remote unhealthy")
    detected_s = time.monotonic() - cut_at
    time.sleep(max(0.0, partition_s - (time.monotonic() - cut_at)))  # the partition lasts

    namespace.heal()
    healed_at = time.monotonic()
    # Bound: a connection attempt within about 2 s of the heal (reconnect backoff capped at
    # 1 s, each attempt given 5 s: its SYNs go out at 0, 1 and 3 s), then two passing probes
    # re-admit it (0.5 s interval).
    wait_until(lambda: state(cluster, "remote") == "HEALTHY", 6, "remote healthy after the heal")
    readmitted_s = time.monotonic() - healed_at
    record(
        f"agent partitioned from the coordinator for {partition_s:.0f} s (iptables DROP)",
        detection_s=round(detected_s, 2),
        client_sees=f"re-admitted {readmitted_s:.1f} s after the heal",
        lost="nothing (its streams failed over when it was found unreachable)",
    )
    return readmitted_s


def test_a_partitioned_node_is_readmitted_soon_after_the_heal(
    make_cluster: MakeCluster,
    namespace: netns.Namespace,
    remote_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    partitioned_readmit(make_cluster, namespace, remote_agent, PARTITION_S)


def test_a_partitioned_agent_aborts_the_requests_of_the_coordinator_it_lost(
    make_cluster: MakeCluster,
    namespace: netns.Namespace,
    remote_agent: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """The coordinator fails the request over (or fails it) once the node is unreachable; the
    agent, which cannot tell the coordinator from a slow one, must not generate on for nobody:
    its keepalive finds the coordinator's connection dead and the session's requests are
    aborted in the engine."""
    cluster = make_cluster(0, coordinator_listen="0.0.0.0:0")
    remote_agent(
        cluster,
        "--sim-ttft-ms",
        "5",
        "--sim-itl-ms",
        "200",
        "--keepalive-time",
        "1",
        "--keepalive-timeout",
        "1",
    )
    wait_until(lambda: state(cluster, "remote") == "HEALTHY", 30, "remote healthy")
    channel = grpc.insecure_channel(cluster.coordinator_address)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    request = generate_pb2.GenerateRequest(
        prompt="partitioned", sampling=generate_pb2.SamplingParams(max_tokens=300)
    )
    call: Any = stub.Generate(request, timeout=60)
    try:
        first = next(call)
        assert first.node_id == "remote"
        namespace.cut()
        cut_at = time.monotonic()
        # Bound: keepalive time + timeout (1 s + 1 s), plus a second of slack.
        load = wait_until(lambda: _aborted(namespace), 6, "the agent to abort its request")
        aborted_s = time.monotonic() - cut_at
    finally:
        call.cancel()
        channel.close()
    assert load["running"] == 0 and load["aborted"] >= 1, load
    record(
        "agent cut off from its coordinator mid-request (keepalive 1 s + 1 s)",
        detection_s=round(aborted_s, 2),
        client_sees="its call failed over or failed clearly at the coordinator",
        lost="no engine time: the agent aborted the orphaned request",
    )


# Asks the agent for its load from inside the namespace (the host cannot reach it now).
_LOAD = """
import json, sys, grpc
from omni_rpc.v1 import node_agent_pb2, node_agent_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    load = node_agent_pb2_grpc.NodeAgentStub(channel).GetLoad(
        node_agent_pb2.GetLoadRequest(), timeout=2)
print(json.dumps({"running": load.running, "aborted": load.aborted}))
"""


def _aborted(namespace: netns.Namespace) -> dict[str, int] | None:
    address = _agent_address(namespace)
    out = subprocess.run(
        namespace.command([sys.executable, "-c", _LOAD, address]),
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
    )
    if out.returncode != 0:
        return None
    load: dict[str, int] = json.loads(out.stdout)
    return load if load["running"] == 0 and load["aborted"] >= 1 else None


def _agent_address(namespace: netns.Namespace) -> str:
    listening = subprocess.run(
        namespace.command(["ss", "-ltnH"]), capture_output=True, text=True, check=True
    ).stdout
    for line in listening.splitlines():
        local = line.split()[3]  # 10.211.N.2:PORT, or [::ffff:10.211.N.2]:PORT
        if namespace.inner_ip in local:
            return f"{namespace.inner_ip}:{local.rsplit(':', 1)[1]}"
    raise AssertionError(f"no agent listening in {namespace.name}:\n{listening}")
