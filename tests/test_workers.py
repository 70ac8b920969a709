"""``omni-coordinator --workers N``: one control process, N workers on one port (real processes).

- totals (GetStats, ListNodes, /metrics) are sums over the workers, exact right after the
  requests finish, and both workers take connections;
- DrainNode answers once every worker has acknowledged: the drained node's agent then starts
  no new request (its own GetLoad ``started`` counter stands still), undrain restores it, and a
  breaker ejection decided by the control process stops every worker's traffic likewise;
- a second coordinator on a port in use exits non-zero naming the port, for 1 and 2 workers;
- a worker that dies is restarted; workers die with the control process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests.conftest import FAST_SIM, agent_load, async_wait_until, node_address, wait_until

MakeCluster = Callable[..., LocalCluster]
HEALTHY = coordinator_pb2.NODE_STATE_HEALTHY
UNHEALTHY = coordinator_pb2.NODE_STATE_UNHEALTHY


def worker_cluster(make_cluster: MakeCluster, nodes: int, *extra: str) -> LocalCluster:
    cluster = make_cluster(nodes, coordinator_args=["--workers", "2", *extra])
    return cluster


async def send(address: str, count: int, connections: int = 20, max_tokens: int = 4) -> int:
    """``count`` Generate calls spread over ``connections`` separate connections (each its own
    subchannel, so the kernel hands them to the workers independently); returns how many
    ended with a finish_reason."""
    done = 0
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections)
    ]

    async def one(i: int) -> None:
        nonlocal done
        stub = coordinator_pb2_grpc.CoordinatorStub(channels[i % connections])
        request = generate_pb2.GenerateRequest(prompt=f"workers {i} {time.monotonic()}")
        request.sampling.max_tokens = max_tokens
        finished = False
        async for response in stub.Generate(request, timeout=30):
            finished = finished or bool(response.finish_reason)
        done += finished

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for channel in channels:
            await channel.close(grace=None)
    return done


def metrics_text(cluster: LocalCluster) -> str:
    assert cluster.log_dir is not None
    port = (cluster.log_dir / "metrics.port").read_text().strip()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text: str = answer.read().decode()
    return text


def sample(text: str, line_start: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def node(cluster: LocalCluster, node_id: str) -> coordinator_pb2.NodeInfo:
    client = CoordinatorClient(cluster.coordinator_address)
    try:
        return next(n for n in client.nodes() if n.node_id == node_id)
    finally:
        client.close()


def started(address: str) -> int:
    return asyncio.run(agent_load(address)).started


# -- totals --------------------------------------------------------------------------------------


def test_stats_and_metrics_are_sums_over_workers(make_cluster: MakeCluster, tmp_path: Path) -> None:
    metrics_port = tmp_path / "metrics.port"
    cluster = worker_cluster(
        make_cluster, 2, "--metrics-port", "0", "--metrics-port-file", str(metrics_port)
    )
    assert cluster.log_dir is not None
    (cluster.log_dir / "metrics.port").write_text(metrics_port.read_text())
    assert asyncio.run(send(cluster.coordinator_address, 200, connections=40)) == 200
    client = CoordinatorClient(cluster.coordinator_address)
    try:
        stats = client.stats()
    finally:
        client.close()
    assert stats.requests_total == 200
    assert stats.requests_succeeded == 200
    assert stats.requests_failed == 0
    assert stats.in_flight == 0
    assert sum(stats.load_distribution.values()) == 200
    assert sum(n.served for n in stats.health_stats.values()) == 200
    assert all(n.in_flight == 0 for n in stats.health_stats.values())
    text = metrics_text(cluster)
    assert sample(text, 'omni_requests_total{status="OK"}') == 200
    assert sample(text, "omni_request_duration_seconds_count") == 200
    per_worker = [sample(text, f'omni_worker_requests_total{{worker="{i}"}}') for i in (0, 1)]
    assert sum(per_worker) == 200
    # Both workers took connections (40 of them: the chance of one worker getting all is nil).
    assert min(per_worker) > 0, per_worker
    assert "omni_health_probe_duration_seconds_count" in text

    # Every worker's log lines say which worker wrote them.
    def finished_lines() -> list[dict[str, object]]:
        log_path = cluster.coordinator.log_path  # type: ignore[union-attr]
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
        return [line for line in lines if line.get("event") == "request finished"]

    # Request lines are written off the event loop, a few milliseconds after the request.
    finished = wait_until(lambda: len(finished_lines()) == 200 and finished_lines(), 10, "logs")
    assert {line["worker"] for line in finished} == {0, 1}


# -- drain and ejection --------------------------------------------------------------------------


async def _load_until(address: str, stop: asyncio.Event) -> int:
    sent = 0
    while not stop.is_set():
        sent += await send(address, 20, connections=10)
    return sent


def test_drain_stops_every_worker_and_undrain_restores(make_cluster: MakeCluster) -> None:
    cluster = worker_cluster(make_cluster, 2)
    address = cluster.coordinator_address
    agent0 = node_address(cluster, "node-0")
    agent1 = node_address(cluster, "node-1")

    async def astarted(agent: str) -> int:
        return (await agent_load(agent)).started

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_load_until(address, stop))
        async with grpc.aio.insecure_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            # The drain happens under load, with requests going to node-0 from both workers.
            await async_wait_until(lambda: _positive(astarted(agent0)), 30, "load on node-0")
            answer = await stub.DrainNode(coordinator_pb2.DrainNodeRequest(node_id="node-0"))
            assert answer.node.node_id == "node-0"
            # What was in flight on node-0 finishes; after that it gets nothing new.
            await async_wait_until(lambda: _idle(stub, "node-0"), 30, "node-0 idle")
            before0, before1 = await astarted(agent0), await astarted(agent1)
            assert await send(address, 100, connections=20) == 100
            assert await astarted(agent0) == before0
            assert await astarted(agent1) >= before1 + 100
            await stub.DrainNode(coordinator_pb2.DrainNodeRequest(node_id="node-0", undrain=True))
            assert await send(address, 60, connections=20) == 60
            assert await astarted(agent0) > before0
        stop.set()
        assert await load > 0

    asyncio.run(scenario())


async def _positive(value: Awaitable[int]) -> bool:
    return await value > 0


async def _idle(stub: coordinator_pb2_grpc.CoordinatorAsyncStub, node_id: str) -> bool:
    nodes = (await stub.ListNodes(coordinator_pb2.ListNodesRequest())).nodes
    return next(n for n in nodes if n.node_id == node_id).in_flight == 0


def test_breaker_ejection_stops_every_worker(make_cluster: MakeCluster) -> None:
    cluster = worker_cluster(
        make_cluster, 2, "--breaker-failures", "2", "--breaker-base-ejection", "60"
    )
    address = cluster.coordinator_address
    agent0 = node_address(cluster, "node-0")
    # node-0's engine fails every request while its health checks pass: only the breaker,
    # fed by both workers' reports, can take it out.
    cluster.agents[0].process.send_signal(signal.SIGUSR2)
    assert asyncio.run(send(address, 40, connections=20)) == 40
    info = wait_until(
        lambda: (n := node(cluster, "node-0")).state == UNHEALTHY and n.ejections and n,
        30,
        "node-0 ejected",
    )
    assert "circuit breaker" in info.state_reason
    wait_until(lambda: node(cluster, "node-0").in_flight == 0, 30, "node-0 idle")
    before = started(agent0)
    assert asyncio.run(send(address, 100, connections=20)) == 100
    assert started(agent0) == before
    assert node(cluster, "node-0").state == UNHEALTHY


# -- the port ------------------------------------------------------------------------------------


def _coordinator(listen: str, workers: int, port_file: Path | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "coordinator", "--listen", listen, "--auth", "off"]
    argv += ["--workers", str(workers), "--log-format", "json"]
    if port_file is not None:
        argv += ["--port-file", str(port_file)]
    env = {**os.environ, "OMNI_PARENT_PID": str(os.getpid())}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


@pytest.mark.parametrize(("first", "second"), [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_second_coordinator_on_a_used_port_fails(first: int, second: int, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    holder = _coordinator("127.0.0.1:0", first, port_file)
    try:
        port = int(wait_until(lambda: port_file.exists() and port_file.read_text(), 60, "port"))
        intruder = _coordinator(f"127.0.0.1:{port}", second)
        output, _ = intruder.communicate(timeout=60)
        assert intruder.returncode not in (0, None), output
        assert str(port) in output and "address in use" in output, output
        # The first one still serves.
        client = CoordinatorClient(f"127.0.0.1:{port}")
        try:
            assert client.stats().num_nodes == 0
        finally:
            client.close()
    finally:
        holder.terminate()
        holder.communicate(timeout=30)
    assert holder.returncode == 0


# -- lifecycle -----------------------------------------------------------------------------------


def _worker_pids(log: Path) -> dict[int, int]:
    """worker index -> pid of its latest process, from the control process's log."""
    pids: dict[int, int] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("event") == "worker attached":
            pids[entry["worker"]] = entry["pid"]
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_dead_worker_is_restarted_and_workers_die_with_control(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(1, coordinator_args=["--workers", "2"], agent_args=FAST_SIM)
    assert cluster.coordinator is not None
    log = cluster.coordinator.log_path
    pids = wait_until(lambda: len(p := _worker_pids(log)) == 2 and p, 30, "2 workers")
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: "worker exited, restarting it" in log.read_text(), 30, "restart logged")
    new = wait_until(
        lambda: (p := _worker_pids(log)).get(0, pids[0]) != pids[0] and p, 30, "new worker 0"
    )
    assert asyncio.run(send(cluster.coordinator_address, 40, connections=20)) == 40
    # The control process killed outright: its workers notice and exit on their own.
    cluster.coordinator.process.kill()
    cluster.coordinator.process.wait()
    wait_until(lambda: not any(_alive(pid) for pid in new.values()), 30, "workers gone")


def test_workers_with_auth_forward_joins_and_serve(make_cluster: MakeCluster) -> None:
    """Tokens are checked by the worker that takes the connection; agents' joins (node role)
    reach the control process through it."""
    cluster = make_cluster(2, auth=True, coordinator_args=["--workers", "2"])
    client = CoordinatorClient(cluster.coordinator_address, security=cluster.client_security())
    try:
        assert sorted(client.stats().healthy_nodes) == ["node-0", "node-1"]
    finally:
        client.close()
    unauthenticated = CoordinatorClient(cluster.coordinator_address)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            unauthenticated.stats()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        unauthenticated.close()
