"""Clients and tools outside Python: the Node.js example against a live cluster, buf lint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from node_agent.engines.sim import simulate
from omni_rpc import config
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2

ROOT = Path(__file__).resolve().parent.parent
NODE_EXAMPLE = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's npm dependencies (grpc-js, proto-loader, buf), installed from the registry."""
    folder = tmp_path_factory.mktemp("npm")
    shutil.copy(NODE_EXAMPLE / "package.json", folder / "package.json")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder / "node_modules"


def run_node_client(node_modules: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``node client.js ARGS`` with the example's npm dependencies."""
    return subprocess.run(
        ["node", str(NODE_EXAMPLE / "client.js"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )


def free_port() -> int:
    """A loopback port nothing listens on (reserved, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_node_client_streams_and_reads_stats(
    make_cluster: Callable[..., LocalCluster], node_modules: Path
) -> None:
    cluster = make_cluster(2)
    prompt = "Hello from Node.js"
    done = subprocess.run(
        ["node", str(NODE_EXAMPLE / "client.js"), cluster.coordinator_address, prompt, "8"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == simulate(prompt, max_tokens=8).text
    assert "finish_reason=length" in lines[1] and "completion_tokens=8" in lines[1]
    assert "num_nodes=2" in lines[2] and "node-0,node-1" in lines[2]


def test_node_client_reports_errors(
    make_cluster: Callable[..., LocalCluster], node_modules: Path
) -> None:
    cluster = make_cluster(1)
    done = subprocess.run(
        ["node", str(NODE_EXAMPLE / "client.js"), cluster.coordinator_address, "", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "prompt" in done.stderr


def test_node_client_balances_over_a_list_and_skips_a_dead_coordinator(
    make_cluster: Callable[..., LocalCluster], node_modules: Path
) -> None:
    """A comma-separated list of coordinators becomes an ipv4: target with round_robin: the
    first address has nothing listening, the second is the live coordinator."""
    cluster = make_cluster(2)
    prompt = "Hello from a list of coordinators"
    addresses = f"127.0.0.1:{free_port()},{cluster.coordinator_address}"
    done = run_node_client(node_modules, addresses, prompt, "8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == simulate(prompt, max_tokens=8).text
    assert "finish_reason=length" in lines[1] and "completion_tokens=8" in lines[1]
    assert "num_nodes=2" in lines[2]


def test_node_client_refuses_a_list_of_host_names(node_modules: Path) -> None:
    done = run_node_client(node_modules, "localhost:50051,localhost:50052", "Hello", "8")
    assert done.returncode == 1
    assert "localhost:50051" in done.stderr and "dns:///" in done.stderr, done.stderr
    assert done.stdout == ""


class CuttingCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator in front of a real one that goes away mid-stream: its first Generate call
    relays ``cut_after`` tokens, then ends with UNAVAILABLE (as a coordinator that died would,
    or, with ``final``, as the coordinator's own verdict, omni-final trailer set); later calls
    are relayed whole. Records every Generate request it receives."""

    def __init__(self, upstream: str, cut_after: int, final: bool = False) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.cut_after, self.final = cut_after, final
        self.requests: list[generate_pb2.GenerateRequest] = []

    def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[generate_pb2.GenerateResponse]:
        self.requests.append(generate_pb2.GenerateRequest.FromString(request.SerializeToString()))
        cut = len(self.requests) == 1
        upstream = self.stub.Generate(request, timeout=30)
        sent = 0
        for response in upstream:
            yield response
            sent += len(response.token_ids)
            if cut and sent >= self.cut_after:
                upstream.cancel()  # type: ignore[no-untyped-call]
                if self.final:
                    context.set_trailing_metadata(((config.FINAL_ERROR_METADATA, "1"),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "coordinator went away")

    def GetStats(
        self, request: coordinator_pb2.GetStatsRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ClusterStats:
        return self.stub.GetStats(request, timeout=10)

    def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.ListNodesResponse:
        return self.stub.ListNodes(request, timeout=10)

    def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.DrainNodeResponse:
        return self.stub.DrainNode(request, timeout=10)


@pytest.fixture
def cutting_coordinator(
    make_cluster: Callable[..., LocalCluster],
) -> Iterator[Callable[..., tuple[CuttingCoordinator, str]]]:
    servers: list[tuple[grpc.Server, CuttingCoordinator]] = []

    def start(cut_after: int, final: bool = False) -> tuple[CuttingCoordinator, str]:
        cluster = make_cluster(2)
        servicer = CuttingCoordinator(cluster.coordinator_address, cut_after, final)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append((server, servicer))
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server, servicer in servers:
        server.stop(grace=None)
        servicer.channel.close()


def test_node_client_continues_a_stream_whose_coordinator_died(
    cutting_coordinator: Callable[..., tuple[CuttingCoordinator, str]], node_modules: Path
) -> None:
    """UNAVAILABLE after 3 tokens, no omni-final: the client sends the same request again
    with resume = what it received, and prints every token exactly once."""
    coordinator, address = cutting_coordinator(cut_after=3)
    prompt = "Hello again from Node.js"
    done = run_node_client(node_modules, address, prompt, "8")
    assert done.returncode == 0, done.stderr
    expected = simulate(prompt, max_tokens=8)
    lines = done.stdout.splitlines()
    assert lines[0] == expected.text
    assert "finish_reason=length" in lines[1] and "completion_tokens=8" in lines[1]
    assert "num_nodes=2" in lines[2]

    first, resumed = coordinator.requests
    assert not first.HasField("resume")
    assert first.request_id and resumed.request_id == first.request_id
    assert resumed.prompt == prompt and resumed.sampling == first.sampling
    assert list(resumed.resume.token_ids) == expected.token_ids[:3]
    assert expected.text.startswith(resumed.resume.text) and resumed.resume.text
    assert resumed.resume.media_items_delivered == 0


def test_node_client_never_retries_a_final_error(
    cutting_coordinator: Callable[..., tuple[CuttingCoordinator, str]], node_modules: Path
) -> None:
    coordinator, address = cutting_coordinator(cut_after=3, final=True)
    done = run_node_client(node_modules, address, "Hello once", "8")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr and "coordinator went away" in done.stderr
    assert len(coordinator.requests) == 1


def test_buf_lint_is_clean(node_modules: Path) -> None:
    done = subprocess.run(
        [str(node_modules / ".bin" / "buf"), "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
