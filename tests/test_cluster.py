"""End-to-end behaviour of a real cluster: coordinator and agents as processes on loopback."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from node_agent.engines.sim import simulate
from omni_rpc import DistributedOrchestrator, GenerationError, HealthMonitor, LoadBalancer
from omni_rpc.launchers.gpus import PlacementError
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests.conftest import (
    agent_load,
    async_wait_until,
    node_address,
    wait_healthy,
    wait_until,
)

MakeCluster = Callable[..., LocalCluster]


def orchestrator(cluster: LocalCluster) -> DistributedOrchestrator:
    return DistributedOrchestrator(coordinator=cluster.coordinator_address, timeout=30)


async def test_round_robin_60_requests_exact_output_20_per_node(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3, strategy="round_robin")
    orch = orchestrator(cluster)
    prompts = [f"prompt number {i}" for i in range(60)]
    results = await orch.generate(prompts, max_tokens=16, seed=7)
    for prompt, result in zip(prompts, results, strict=True):
        expected = simulate(prompt, max_tokens=16, seed=7)
        assert result.text == expected.text
        assert result.token_ids == expected.token_ids
        assert result.finish_reason == "length"
        assert result.attempts == 1
        assert result.usage == {
            "prompt_tokens": 3,
            "completion_tokens": 16,
            "cached_prompt_tokens": 0,
        }
    served = collections.Counter(r.node_id for r in results)
    assert served == {"node-0": 20, "node-1": 20, "node-2": 20}
    stats = orch.get_stats()
    assert stats["num_nodes"] == 3
    assert stats["healthy_nodes"] == ["node-0", "node-1", "node-2"]
    assert stats["unhealthy_nodes"] == []
    assert stats["load_distribution"] == {"node-0": 20, "node-1": 20, "node-2": 20}
    assert {n["served"] for n in stats["health_stats"].values()} == {20}
    await orch.aclose()


async def test_client_cancel_aborts_in_the_engine(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(1, agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "20"])
    orch = orchestrator(cluster)
    stream = orch.stream("a long story", max_tokens=2000)
    first = await anext(stream)
    assert first.text
    address = node_address(cluster, first.node_id)
    before = await agent_load(address)
    assert before.running == 1 and before.aborted == 0
    await stream.aclose()  # the client walks away mid-stream

    async def aborted() -> bool:
        load = await agent_load(address)
        return load.aborted == 1 and load.running == 0

    # Not a speed test (the unit tests check that the attempt is stopped at once): a generous
    # bound that only a request left running in the engine would exceed.
    await async_wait_until(aborted, 15.0, "the engine to count the request as aborted")
    await orch.aclose()


async def test_deadline_shorter_than_generation(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(1, agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "20"])
    orch = orchestrator(cluster)
    with pytest.raises(GenerationError) as info:
        await orch.generate(["never finishes in time"], max_tokens=2000, timeout=0.5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    address = node_address(cluster, "node-0")

    async def aborted() -> bool:
        load = await agent_load(address)
        return load.aborted == 1 and load.running == 0

    await async_wait_until(aborted, 15.0, "the engine to abort the expired request")
    await orch.aclose()


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("no prompt", {}, "prompt"),
    ("max_tokens zero", {"max_tokens": 0}, "sampling.max_tokens"),
    ("max_tokens negative", {"max_tokens": -1}, "sampling.max_tokens"),
    ("temperature negative", {"temperature": -1.0}, "sampling.temperature"),
    ("temperature nan", {"temperature": float("nan")}, "sampling.temperature"),
    ("temperature inf", {"temperature": float("inf")}, "sampling.temperature"),
    ("top_p zero", {"top_p": 0.0}, "sampling.top_p"),
    ("top_p above one", {"top_p": 1.01}, "sampling.top_p"),
    ("top_k negative", {"top_k": -5}, "sampling.top_k"),
]


async def test_bad_input_is_invalid_argument_naming_the_field(
    coordinator_stub: tuple[LocalCluster, coordinator_pb2_grpc.CoordinatorAsyncStub],
) -> None:
    _cluster, stub = coordinator_stub
    for name, sampling, field in BAD_REQUESTS:
        request = generate_pb2.GenerateRequest(prompt="" if name == "no prompt" else "hi")
        for key, value in sampling.items():
            setattr(request.sampling, key, value)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request, timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert field in (info.value.details() or ""), name
    # Nothing reached a node, and the cluster still serves.
    stats = await stub.GetStats(coordinator_pb2.GetStatsRequest())
    assert sum(stats.load_distribution.values()) == 0
    ok = [r async for r in stub.Generate(generate_pb2.GenerateRequest(prompt="fine"), timeout=10)]
    assert ok[-1].finish_reason == "length"


def test_unknown_strategy_fails_at_start_up_with_exit_code_2() -> None:
    for cmd in (
        [sys.executable, "-m", "coordinator", "--listen", "127.0.0.1:0", "--strategy", "fastest"],
        [sys.executable, "-m", "coordinator", "--max-retries", "-1"],
        [sys.executable, "-m", "coordinator", "--health-check-interval", "0"],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", "--listen", "127.0.0.1:0", "--strategy", "fastest"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "unknown load balancing strategy 'fastest'" in done.stderr
    assert "least_loaded" in done.stderr and "round_robin" in done.stderr


def test_sdk_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="load_balancing_strategy"):
        DistributedOrchestrator(model="m", engine="sim", load_balancing_strategy="fastest")
    with pytest.raises(PlacementError, match="cannot connect to the Ray cluster at auto"):
        DistributedOrchestrator(model="m", engine="sim", ray_address="auto")  # no Ray running here
    with pytest.raises(ValueError, match="launcher"):
        DistributedOrchestrator(model="m", engine="sim", launcher="slurm")
    with pytest.raises(ValueError, match="num_nodes"):
        DistributedOrchestrator(model="m", engine="sim", num_nodes=0)
    with pytest.raises(ValueError, match="max_retries"):
        DistributedOrchestrator(model="m", engine="sim", max_retries=-1)


async def test_no_healthy_nodes_available(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(0)
    orch = orchestrator(cluster)
    with pytest.raises(GenerationError) as info:
        await orch.generate(["anyone there?"], timeout=1.0)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "no healthy nodes available" in info.value.message
    await orch.aclose()


async def test_coordinator_restart_agents_rejoin(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2)
    orch = orchestrator(cluster)
    assert (await orch.generate(["before"], max_tokens=4))[0].text == simulate(
        "before", max_tokens=4
    ).text
    first_id = orch.get_stats()["coordinator_id"]
    agent_pids = [a.process.pid for a in cluster.agents]

    cluster.restart_coordinator()
    wait_healthy(cluster, 2, timeout=30)
    stats = orch.get_stats()
    assert stats["coordinator_id"] != first_id
    assert [a.process.pid for a in cluster.agents] == agent_pids
    assert all(a.alive for a in cluster.agents)
    results = await orch.generate(["after 1", "after 2"], max_tokens=4)
    assert [r.text for r in results] == [
        simulate(p, max_tokens=4).text for p in ("after 1", "after 2")
    ]
    await orch.aclose()


async def test_health_serving_and_reflection_on_both_servers(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(1)
    agent = node_address(cluster, "node-0")
    checks = {
        cluster.coordinator_address: ["", "omni.v1.Coordinator", "omni.v1.Registry"],
        agent: ["", "omni.v1.NodeAgent"],
    }
    for address, services in checks.items():
        async with grpc.aio.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in services:
                response = await health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=5
                )
                assert response.status == health_pb2.HealthCheckResponse.SERVING, (address, service)
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflect.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            listed = [s.name async for r in call for s in r.list_services_response.service]
            assert "grpc.health.v1.Health" in listed
            assert services[1] in listed
    assert "omni.v1.Coordinator" in [
        s.name
        async for r in reflection_pb2_grpc.ServerReflectionStub(
            grpc.aio.insecure_channel(cluster.coordinator_address)
        ).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        for s in r.list_services_response.service
    ]


def test_agent_keeps_trying_to_join_and_logs_why(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(0, wait=False)
    # Free the coordinator's port: the agent is pointed at an address nobody listens on.
    address = cluster.coordinator_address
    assert cluster.coordinator is not None
    cluster.coordinator.process.send_signal(signal.SIGTERM)
    assert cluster.coordinator.process.wait(15) == 0
    agent = cluster.start_agent(0)

    def retried() -> bool:
        text = agent.log_path.read_text()
        return text.count("cannot join the coordinator") >= 2 and address in text

    wait_until(retried, 15.0, "the agent to log repeated join failures")
    cluster.start_coordinator(address, 30.0)
    wait_healthy(cluster, 1, timeout=30)


async def test_sigterm_coordinator_finishes_in_flight_and_exits_0(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(1, agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "20"])
    orch = orchestrator(cluster)
    stream = orch.stream("finish me", max_tokens=40)
    text = (await anext(stream)).text
    assert cluster.coordinator is not None
    cluster.coordinator.process.send_signal(signal.SIGTERM)
    async for delta in stream:
        text += delta.text
    assert text == simulate("finish me", max_tokens=40).text
    assert await asyncio.to_thread(cluster.coordinator.process.wait, 15) == 0
    await orch.aclose()


async def test_sigterm_agent_drains_then_leaves(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2, agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "20"])
    orch = orchestrator(cluster)
    stream = orch.stream("drain me", max_tokens=40)
    first = await anext(stream)
    victim = cluster.agents[int(first.node_id.split("-")[1])]
    victim.process.send_signal(signal.SIGTERM)
    text = first.text
    async for delta in stream:
        text += delta.text
    assert text == simulate("drain me", max_tokens=40).text
    assert await asyncio.to_thread(victim.process.wait, 15) == 0
    wait_until(lambda: orch.get_stats()["num_nodes"] == 1, 5.0, "the agent to leave")
    other = (await orch.generate(["still served"], max_tokens=4))[0]
    assert other.node_id != first.node_id
    await orch.aclose()


async def test_drain_and_undrain(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2)
    client = CoordinatorClient(cluster.coordinator_address)
    drained = client.drain("node-0")
    assert drained.node.state == coordinator_pb2.NODE_STATE_DRAINING and drained.drained
    orch = orchestrator(cluster)
    results = await orch.generate([f"d{i}" for i in range(6)], max_tokens=4)
    assert {r.node_id for r in results} == {"node-1"}
    with pytest.raises(grpc.RpcError) as info:
        client.drain("node-9")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.drain("node-0", undrain=True).node.state == coordinator_pb2.NODE_STATE_HEALTHY
    results = await orch.generate([f"u{i}" for i in range(6)], max_tokens=4)
    assert {r.node_id for r in results} == {"node-0", "node-1"}
    client.close()
    await orch.aclose()


def test_load_balancer_and_health_monitor_views(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    monitor = HealthMonitor(coordinator=cluster.coordinator_address)
    assert monitor.get_healthy_nodes() == ["node-0", "node-1", "node-2"]
    health = monitor.get_health_stats()
    assert {h["state"] for h in health.values()} == {"healthy"}
    balancer = LoadBalancer("round_robin", coordinator=cluster.coordinator_address)
    plan = balancer.distribute_requests([f"p{i}" for i in range(6)], monitor.get_healthy_nodes())
    assert {k: len(v) for k, v in plan.items()} == {"node-0": 2, "node-1": 2, "node-2": 2}
    only = balancer.distribute_requests(["a", "b"], ["node-1"])
    assert only == {"node-1": ["a", "b"]}
    loads = balancer.get_load_stats()
    assert set(loads) == {"node-0", "node-1", "node-2"}
    assert all(v["capacity"] > 0 for v in loads.values())


async def test_local_cluster_started_by_the_sdk() -> None:
    async with DistributedOrchestrator(
        model="sim",
        num_nodes=2,
        load_balancing_strategy="round_robin",
        agent_args=["--sim-ttft-ms", "1", "--sim-itl-ms", "1"],
    ) as orch:
        assert orch.cluster is not None
        pids = [c.process.pid for c in [orch.cluster.coordinator, *orch.cluster.agents] if c]
        prompts = [
            "Generate an image of a sunset",
            "Create a picture of a mountain",
            "Draw a forest landscape",
        ]
        results = await orch.generate(prompts, max_tokens=8)
        assert [str(r) for r in results] == [simulate(p, max_tokens=8).text for p in prompts]
        stats = orch.get_stats()
        assert stats["num_nodes"] == 2 and len(stats["healthy_nodes"]) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_children_shut_down_when_the_launcher_dies(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from omni_rpc.launchers.local import LocalCluster\n"
        f"c = LocalCluster(num_nodes=1, log_dir=__import__('pathlib').Path({str(tmp_path)!r}))\n"
        "c.start()\n"
        "print(c.coordinator.process.pid, c.agents[0].process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    pids = [int(p) for p in launcher.stdout.readline().split()]
    assert len(pids) == 2
    launcher.kill()  # no chance to clean up
    launcher.wait(10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # An exited child of a dead parent is reaped by init; a zombie counts as gone.
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(p) for p in pids), 20.0, "the orphaned children to exit")
