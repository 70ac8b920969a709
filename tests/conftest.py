"""Fixtures that start real clusters (coordinator and agents as processes on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import coordinator_pb2_grpc, node_agent_pb2, node_agent_pb2_grpc, node_pb2

# Fast simulated nodes: tests check behaviour, not speed.
# A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so
# would every process it starts (exec keeps an ignored signal ignored), while the tests that
# press Ctrl-C on a child (omni up, omni top) need it delivered. A handled signal is reset to
# its default across exec: handling it here gives the children their Ctrl-C back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAST_SIM = ["--sim-ttft-ms", "5", "--sim-itl-ms", "2"]


def record(scenario: str, **figures: object) -> None:
    """Append a reliability scenario's measured figures to $OMNI_RELIABILITY_TABLE (when set),
    one JSON object per line: docs/reliability.md's table of scenarios comes from such a run."""
    path = os.environ.get("OMNI_RELIABILITY_TABLE")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": scenario, **figures}) + "\n")


def start_sim_agent(
    log_path: Path,
    coordinator: str,
    listen: str,
    node_id: str,
    *extra: str,
    prefix: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """A simulated agent outside any LocalCluster (auth off, JSON log to ``log_path``), joined
    to ``coordinator``; ``prefix`` runs it through another command (a network namespace)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "node_agent",
                "--coordinator",
                coordinator,
                "--listen",
                listen,
                "--node-id",
                node_id,
                "--engine",
                "sim",
                "--auth",
                "off",
                "--log-format",
                "json",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def async_wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def read_pty(master: int) -> tuple[list[bytes], threading.Thread]:
    """Collect what a child writes to its terminal (``master``) on a daemon thread."""
    chunks: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while data := os.read(master, 65536):
                chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return chunks, reader


def healthy_nodes(address: str, security: ChannelSecurity | None = None) -> list[str]:
    client = CoordinatorClient(address, security=security)
    try:
        return list(client.stats().healthy_nodes)
    finally:
        client.close()


def wait_healthy(cluster: LocalCluster, count: int, timeout: float = 60.0) -> None:
    def ready() -> bool:
        cluster.check_alive()
        healthy = healthy_nodes(cluster.coordinator_address, cluster.client_security())
        return len(healthy) >= count

    wait_until(ready, timeout, f"{count} healthy nodes")


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Start a LocalCluster (waits until all its nodes are healthy); stopped at teardown."""
    clusters: list[LocalCluster] = []

    def make(num_nodes: int = 3, wait: bool = True, **kwargs: Any) -> LocalCluster:
        kwargs.setdefault("agent_args", FAST_SIM)
        kwargs.setdefault("health_check_interval", 0.5)
        cluster = LocalCluster(
            num_nodes=num_nodes, log_dir=tmp_path / f"cluster-{len(clusters)}", **kwargs
        )
        clusters.append(cluster)
        cluster.start()
        if wait:
            wait_healthy(cluster, num_nodes)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
async def coordinator_stub(
    make_cluster: Callable[..., LocalCluster],
) -> AsyncIterator[tuple[LocalCluster, coordinator_pb2_grpc.CoordinatorAsyncStub]]:
    cluster = make_cluster(2)
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        yield cluster, coordinator_pb2_grpc.CoordinatorStub(channel)


async def agent_load(address: str) -> node_pb2.NodeLoad:
    async with grpc.aio.insecure_channel(address) as channel:
        load: node_pb2.NodeLoad = await node_agent_pb2_grpc.NodeAgentStub(channel).GetLoad(
            node_agent_pb2.GetLoadRequest(), timeout=5
        )
        return load


def node_address(cluster: LocalCluster, node_id: str) -> str:
    client = CoordinatorClient(cluster.coordinator_address)
    try:
        return next(n.address for n in client.nodes() if n.node_id == node_id)
    finally:
        client.close()
