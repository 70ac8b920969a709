"""Reliability scenarios on real processes: who answers, stuck and slow nodes, flapping,
forgotten entries, cancellations, and health checks on a loaded host.

Each test reproduces a failure once seen on real processes and fails without its fix, and
records its figures (``tests.conftest.record``) for docs/reliability.md's table.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from node_agent.engines.sim import simulate
from omni_rpc import DistributedOrchestrator
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests.conftest import FAST_SIM, record, start_sim_agent, wait_until

MakeCluster = Callable[..., LocalCluster]


def nodes(cluster: LocalCluster) -> dict[str, coordinator_pb2.NodeInfo]:
    client = CoordinatorClient(cluster.coordinator_address)
    try:
        return {n.node_id: n for n in client.nodes()}
    finally:
        client.close()


def state(cluster: LocalCluster, node_id: str) -> str:
    info = nodes(cluster).get(node_id)
    if info is None:
        return "absent"
    return coordinator_pb2.NodeState.Name(info.state).removeprefix("NODE_STATE_").lower()


def state_changes(cluster: LocalCluster, node_id: str) -> list[dict[str, object]]:
    """The coordinator's "node state changed" log lines for ``node_id``, in order."""
    assert cluster.log_dir is not None
    changes = []
    for line in (cluster.log_dir / "coordinator.log").read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("event") == "node state changed" and entry.get("node_id") == node_id:
            changes.append(entry)
    return changes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_agent(
    cluster: LocalCluster, node_id: str, listen: str, *extra: str
) -> subprocess.Popen[bytes]:
    assert cluster.log_dir is not None
    return start_sim_agent(
        cluster.log_dir / f"{node_id}.log",
        cluster.coordinator_address,
        listen,
        node_id,
        *FAST_SIM,
        *extra,
    )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
        process.wait()


# -- who answers --------------------------------------------------------------------------------


def test_a_different_process_at_a_dead_nodes_address_is_not_taken_for_it(
    make_cluster: MakeCluster, processes: list[subprocess.Popen[bytes]]
) -> None:
    """An agent dies and another agent (another model) takes its port: the dead node must be
    gone from the registry, never re-admitted with the other process serving its traffic."""
    cluster = make_cluster(1, coordinator_args=["--health-check-timeout", "0.5"])
    listen = f"127.0.0.1:{free_port()}"
    victim = start_agent(cluster, "victim", listen, "--model", "model-a")
    processes.append(victim)
    wait_until(lambda: state(cluster, "victim") == "healthy", 30, "victim healthy")

    victim.kill()
    victim.wait()
    killed_at = time.monotonic()
    intruder = start_agent(cluster, "intruder", listen, "--model", "model-b")
    processes.append(intruder)
    wait_until(lambda: state(cluster, "intruder") == "healthy", 30, "intruder healthy")
    wait_until(lambda: state(cluster, "victim") == "absent", 10, "victim removed")
    removed_after = time.monotonic() - killed_at
    # A few more health intervals: it must not come back under the other process.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert state(cluster, "victim") == "absent"
        time.sleep(0.1)
    listed = nodes(cluster)
    assert sorted(listed) == ["intruder", "node-0"], sorted(listed)
    assert listed["intruder"].model == "model-b"
    healthy = CoordinatorClient(cluster.coordinator_address)
    try:
        assert sorted(healthy.stats().healthy_nodes) == ["intruder", "node-0"]
    finally:
        healthy.close()
    reasons = [str(c["reason"]) for c in state_changes(cluster, "victim")]
    assert not any(c["new_state"] == "healthy" for c in state_changes(cluster, "victim")[1:])
    assert any("different process" in r for r in reasons), reasons
    record(
        "another process takes a dead agent's address",
        detection_s=round(removed_after, 2),
        client_sees="nothing (the dead node's streams failed over when it died)",
        lost="nothing",
    )


# -- stuck and slow nodes ------------------------------------------------------------------------


async def test_a_stuck_node_is_failed_over_and_ejected(make_cluster: MakeCluster) -> None:
    """One node passes its health checks but produces a token every 30 s: its attempts stall,
    fail over with resume, and count against it until the breaker ejects it."""
    cluster = make_cluster(
        3,
        coordinator_args=["--stall-timeout", "1", "--breaker-failures", "2"],
        per_agent_args={2: ["--sim-itl-ms", "30000"]},
    )

    async def one(orch: DistributedOrchestrator, i: int) -> float:
        prompt = f"stuck {i}"
        started = time.monotonic()
        out = await orch.generate_one(prompt, max_tokens=6, seed=1)
        expected = simulate(prompt, max_tokens=6, seed=1)
        assert out.token_ids == expected.token_ids and out.text == expected.text, prompt
        assert out.finish_reason == "length"
        return time.monotonic() - started if "node-2" in out.nodes else 0.0

    async with DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30) as orch:
        took = await asyncio.gather(*(one(orch, i) for i in range(12)))
    info = nodes(cluster)["node-2"]
    assert info.state == coordinator_pb2.NODE_STATE_UNHEALTHY, info
    assert info.failures >= 2
    assert "stalled" in info.state_reason and "circuit breaker open" in info.state_reason
    record(
        "node passes health checks but produces a token every 30 s",
        detection_s="1 (--stall-timeout 1)",
        client_sees=f"complete outputs; stalled requests took at most {max(took):.1f}s",
        lost="nothing",
    )


async def test_a_node_far_slower_than_its_peers_is_ejected(make_cluster: MakeCluster) -> None:
    """A node 10x slower per token than the others is ejected as a latency outlier and gets
    no more traffic while ejected."""
    cluster = make_cluster(
        3,
        agent_args=["--sim-ttft-ms", "2", "--sim-itl-ms", "2"],
        per_agent_args={2: ["--sim-ttft-ms", "20", "--sim-itl-ms", "20"]},
    )
    started = time.monotonic()
    async with DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30) as orch:
        # Keep traffic flowing until the outlier check (every few seconds) has run on enough
        # samples and ejected the slow node.
        batch = 0
        while state(cluster, "node-2") == "healthy":
            assert time.monotonic() - started < 40, "node-2 was never ejected"
            prompts = [f"outlier {batch}-{k}" for k in range(6)]
            for out in await orch.generate(prompts, max_tokens=16, seed=2):
                assert out.finish_reason == "length"
            batch += 1
        ejected_after = time.monotonic() - started
        dispatched = nodes(cluster)["node-2"].dispatched
        await orch.generate([f"after {k}" for k in range(12)], max_tokens=8, seed=2)
    info = nodes(cluster)["node-2"]
    assert info.state_reason.startswith("latency outlier (ejection #1"), info.state_reason
    assert info.dispatched == dispatched  # nothing more while ejected
    assert state(cluster, "node-0") == state(cluster, "node-1") == "healthy"
    record(
        "node 10x slower per token than its peers",
        detection_s=round(ejected_after, 1),
        client_sees="complete outputs; no traffic to the node while ejected",
        lost="nothing",
    )


# -- flapping ---------------------------------------------------------------------------------


def test_a_flapping_node_is_held_out(make_cluster: MakeCluster) -> None:
    """A node frozen 1 s out of every 1.5 s: re-admissions are damped (growing hold-downs),
    not one per cycle."""
    cluster = make_cluster(2, coordinator_args=["--health-check-timeout", "0.25"])
    pid = cluster.agents[1].process.pid
    duration = 15.0
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(1.0)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    changes = state_changes(cluster, "node-1")
    readmissions = [c for c in changes[1:] if c["new_state"] == "healthy"]
    ejections = [c for c in changes if c["new_state"] == "unhealthy"]
    assert ejections, "the freezes were never detected"
    # Undamped, each 1.5 s cycle re-admitted the node (10 in 15 s); held out 2, 4, 8 s: <= 4.
    assert len(readmissions) <= 4, [c["reason"] for c in changes]
    assert any("flapping" in str(c["reason"]) for c in ejections)
    record(
        "node frozen 1 s out of every 1.5 s for 15 s",
        detection_s="0.5 (interval 0.5 s, timeout 0.25 s, confirmed at 0.5 s)",
        client_sees=f"{len(readmissions)} re-admissions in {duration:.0f} s (undamped: ~10)",
        lost="nothing",
    )


# -- forgotten entries ----------------------------------------------------------------------------


def test_an_unreachable_node_is_forgotten(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2, coordinator_args=["--forget-after", "3"])
    cluster.agents[1].process.kill()
    killed_at = time.monotonic()
    wait_until(lambda: state(cluster, "node-1") == "absent", 15, "node-1 forgotten")
    forgotten_after = time.monotonic() - killed_at
    assert forgotten_after >= 3.0
    assert list(nodes(cluster)) == ["node-0"]
    record(
        "agent gone for good (--forget-after 3)",
        detection_s=round(forgotten_after, 1),
        client_sees="num_nodes drops; no probes of the dead address",
        lost="nothing",
    )


# -- cancellations ----------------------------------------------------------------------------


def request(prompt: str, max_tokens: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt=prompt, sampling=generate_pb2.SamplingParams(max_tokens=max_tokens)
    )


async def test_cancellations_are_not_failures(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2, agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "20"])
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for i in range(5):
            call = stub.Generate(request(f"c{i}", 200))
            async for response in call:
                if response.token_ids:
                    break
            call.cancel()
        # Deadlines the callers set themselves are theirs too.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.Generate(request("late", 200), timeout=0.3):
                pass
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finals = [r.finish_reason async for r in stub.Generate(request("ok", 3))]
        assert finals[-1] == "length"

    def settled() -> coordinator_pb2.ClusterStats | None:
        client = CoordinatorClient(cluster.coordinator_address)
        try:
            stats = client.stats()
        finally:
            client.close()
        return stats if stats.in_flight == 0 else None

    stats = wait_until(settled, 10, "no request in flight")
    assert stats.requests_cancelled == 6, stats
    assert stats.requests_failed == 0, stats
    assert stats.requests_total == 7


# -- health checks on a loaded host ---------------------------------------------------------------


def test_late_health_answers_do_not_eject_healthy_nodes(make_cluster: MakeCluster) -> None:
    """Agents not scheduled for 0.7 s at a time (what a saturated host does to a process)
    while the coordinator checks every 0.5 s with a 0.5 s timeout: their answers come late,
    not never, and must not be taken for dead nodes. A node that does not answer at all is
    still ejected (tests/test_fault_tolerance.py), 2 timeouts after its check began."""
    cluster = make_cluster(3, coordinator_args=["--health-check-timeout", "0.5"])
    pids = [agent.process.pid for agent in cluster.agents]
    end = time.monotonic() + 8.0
    pauses = 0
    try:
        while time.monotonic() < end:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
                time.sleep(0.7)
                os.kill(pid, signal.SIGCONT)
                pauses += 1
                time.sleep(0.3)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    ejections = [
        c
        for node_id in ("node-0", "node-1", "node-2")
        for c in state_changes(cluster, node_id)
        if c["new_state"] == "unhealthy"
    ]
    assert not ejections, [c["reason"] for c in ejections]
    record(
        f"agents paused 0.7 s at a time ({pauses} pauses; checks every 0.5 s, timeout 0.5 s)",
        detection_s="not ejected (a late answer is slow, not dead)",
        client_sees="0 ejections of healthy nodes",
        lost="nothing",
    )
