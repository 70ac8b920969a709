"""Reliability of the node agent with real processes: engine ids unique per attempt, a default
node id that survives restarts, and a partitioned coordinator's requests aborted by keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from node_agent.engines.sim import simulate
from omni_rpc import config
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2
from tests.conftest import agent_load, async_wait_until, node_address, record, wait_until

MakeCluster = Callable[..., LocalCluster]
Popen = subprocess.Popen[bytes]


# -- 1. two calls sharing a client request_id -----------------------------------------------------


async def test_cancelling_one_of_two_calls_sharing_a_request_id_spares_the_other(
    make_cluster: MakeCluster,
) -> None:
    # One agent: both calls of a pair run on the same engine at the same time. The engine
    # aborts by id; were it given the client's request_id, the cancel of the first would end
    # the second too (OK, finish_reason "abort", its text cut short).
    cluster = make_cluster(1, agent_args=["--sim-ttft-ms", "5", "--sim-itl-ms", "20"])
    pairs, max_tokens = 30, 40
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        def call(pair: int) -> grpc.aio.UnaryStreamCall[object, generate_pb2.GenerateResponse]:
            request = generate_pb2.GenerateRequest(
                request_id=f"shared-{pair}",
                prompt=f"pair number {pair}",
                sampling=generate_pb2.SamplingParams(max_tokens=max_tokens),
            )
            return stub.Generate(request, timeout=60)  # type: ignore[return-value]

        async def run_pair(pair: int) -> list[generate_pb2.GenerateResponse]:
            doomed, spared = call(pair), call(pair)
            spared_responses = asyncio.create_task(_all(spared))
            first = await doomed.read()
            assert isinstance(first, generate_pb2.GenerateResponse) and first.token_ids
            doomed.cancel()  # the client walks away after its first token
            return await spared_responses

        results = await asyncio.gather(*(run_pair(p) for p in range(pairs)))
    for pair, responses in enumerate(results):
        expected = simulate(f"pair number {pair}", max_tokens=max_tokens)
        assert responses[-1].finish_reason == "length", (pair, responses[-1])
        assert "".join(r.text for r in responses) == expected.text, pair
        assert [t for r in responses for t in r.token_ids] == expected.token_ids, pair
        assert {r.request_id for r in responses} == {f"shared-{pair}"}  # the client's id
        assert {r.attempt for r in responses} == {1}  # not failed over and resumed
    address = node_address(cluster, "node-0")

    async def settled() -> bool:
        load = await agent_load(address)
        return load.running == 0 and load.finished + load.aborted == 2 * pairs

    await async_wait_until(settled, 30.0, "every request to end in the engine")
    load = await agent_load(address)
    # Every spared call finished; only the cancelled ones were aborted.
    assert (load.finished, load.aborted, load.failed) == (pairs, pairs, 0)
    record(
        f"{pairs} pairs of concurrent calls sharing a request_id, one of each cancelled",
        detection_s="n/a (engine ids are unique per attempt)",
        client_sees=f"all {pairs} spared calls complete (finish_reason length, 1 attempt)",
        lost="nothing",
    )


async def _all(
    call: grpc.aio.UnaryStreamCall[object, generate_pb2.GenerateResponse],
) -> list[generate_pb2.GenerateResponse]:
    return [response async for response in call]


# -- 3. the default node id survives restarts -----------------------------------------------------


@contextlib.contextmanager
def agent_process(coordinator: str, log_dir: Path, run: int) -> Iterator[tuple[Popen, str]]:
    """An agent started without --node-id on port 0; yields it and its address."""
    port_file = log_dir / f"agent-{run}.port"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}  # a CPU agent
    env[config.PARENT_PID_ENV] = str(os.getpid())
    with open(log_dir / f"agent-{run}.log", "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node_agent",
                "--coordinator",
                coordinator,
                "--listen",
                "127.0.0.1:0",
                "--engine",
                "sim",
                "--auth",
                "off",
                "--port-file",
                str(port_file),
                "--log-format",
                "json",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        port = wait_until(
            lambda: _port(port_file, process), 30.0, f"agent run {run} to write its port"
        )
        yield process, f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _port(port_file: Path, process: Popen) -> int | None:
    assert process.poll() is None, f"the agent exited with {process.returncode}"
    if port_file.exists():
        return int(port_file.read_text())
    return None


def test_an_agent_restarted_without_node_id_keeps_one_entry(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(0)
    client = CoordinatorClient(cluster.coordinator_address)
    expected_id = f"{socket.gethostname()}-cpu"
    try:
        for run in range(6):  # started, then killed and restarted 5 times
            with agent_process(cluster.coordinator_address, tmp_path, run) as (process, address):

                def healthy_here(address: str = address) -> bool:
                    return any(
                        n.address == address and n.state == coordinator_pb2.NODE_STATE_HEALTHY
                        for n in client.nodes()
                    )

                wait_until(healthy_here, 30.0, f"agent run {run} healthy at {address}")
                process.send_signal(signal.SIGKILL)  # no Leave: the entry stays behind
        nodes = client.nodes()
        assert [n.node_id for n in nodes] == [expected_id], nodes
        assert nodes[0].address == address
        record(
            "agent without --node-id killed and restarted 5 times",
            detection_s="at its re-join (same default id, new incarnation)",
            client_sees=f"one entry ({expected_id}), num_nodes 1",
            lost="nothing",
        )
    finally:
        client.close()


# -- 4. a partitioned coordinator's requests are aborted ------------------------------------------


async def test_a_frozen_coordinators_requests_are_aborted_by_keepalive(
    make_cluster: MakeCluster,
) -> None:
    # Slow tokens: the request would run for a minute. SIGSTOP keeps the coordinator's sockets
    # open (no FIN, no RST), as a partition does: only the agent's keepalive pings notice.
    cluster = make_cluster(
        1,
        agent_args=[
            *["--sim-ttft-ms", "5", "--sim-itl-ms", "100"],
            *["--keepalive-time", "1", "--keepalive-timeout", "1"],
        ],
    )
    address = node_address(cluster, "node-0")
    coordinator = cluster.coordinator
    assert coordinator is not None
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        call = stub.Generate(
            generate_pb2.GenerateRequest(
                prompt="a very long story", sampling=generate_pb2.SamplingParams(max_tokens=600)
            ),
            timeout=120,
        )
        first = await call.read()
        assert isinstance(first, generate_pb2.GenerateResponse) and first.token_ids
        load = await agent_load(address)
        assert (load.running, load.aborted) == (1, 0)
        coordinator.process.send_signal(signal.SIGSTOP)
        try:

            async def aborted() -> bool:
                load = await agent_load(address)
                return load.running == 0 and load.aborted >= 1

            # keepalive 1 s + 1 s: the generous bound is far below the request's minute.
            await async_wait_until(aborted, 10.0, "the agent to abort the frozen session's request")
        finally:
            coordinator.process.send_signal(signal.SIGCONT)
            call.cancel()
