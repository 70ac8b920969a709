"""Tokens and roles, and node identity, against real processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omni_rpc import config
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    node_agent_pb2,
    node_agent_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import FAST_SIM, wait_until
from tests.test_cli import free_port, omni

MakeCluster = Callable[..., LocalCluster]


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def generate(channel: grpc.Channel) -> list[generate_pb2.GenerateResponse]:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    request = generate_pb2.GenerateRequest(prompt="hello")
    request.sampling.max_tokens = 4
    return list(stub.Generate(request, timeout=10))


def node_ids(cluster: LocalCluster) -> list[str]:
    client = CoordinatorClient(cluster.coordinator_address, security=cluster.client_security())
    try:
        return [n.node_id for n in client.nodes()]
    finally:
        client.close()


def test_roles_and_tokens_on_the_coordinator(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2, auth=True)
    address = cluster.coordinator_address
    as_role = {
        role: ChannelSecurity(token=cluster.tokens[role]).sync_channel(address)
        for role in ("client", "admin", "node")
    }
    anonymous = grpc.insecure_channel(address)
    wrong = ChannelSecurity(token="not-a-token").sync_channel(address)
    try:
        stats = coordinator_pb2.GetStatsRequest()
        drain = coordinator_pb2.DrainNodeRequest(node_id="node-1")
        undrain = coordinator_pb2.DrainNodeRequest(node_id="node-1", undrain=True)

        def rpc(channel: grpc.Channel, name: str, request: object) -> grpc.StatusCode:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            return code_of(lambda: getattr(stub, name)(request, timeout=10))

        # A client generates and reads; it may not drain.
        assert len(generate(as_role["client"])) >= 1
        assert rpc(as_role["client"], "GetStats", stats) == grpc.StatusCode.OK
        assert rpc(as_role["client"], "DrainNode", drain) == grpc.StatusCode.PERMISSION_DENIED
        # An admin may.
        assert rpc(as_role["admin"], "DrainNode", drain) == grpc.StatusCode.OK
        assert rpc(as_role["admin"], "DrainNode", undrain) == grpc.StatusCode.OK
        # The node role is for membership only.
        assert code_of(lambda: generate(as_role["node"])) == grpc.StatusCode.PERMISSION_DENIED
        join = registry_pb2.JoinRequest(node_id="x", address="127.0.0.1:1")
        client_registry = registry_pb2_grpc.RegistryStub(as_role["client"])
        assert (
            code_of(lambda: client_registry.Join(join, timeout=10))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        # No token, or a wrong one: UNAUTHENTICATED, whatever the method.
        for channel in (anonymous, wrong):
            assert code_of(lambda: generate(channel)) == grpc.StatusCode.UNAUTHENTICATED  # noqa: B023
            assert rpc(channel, "GetStats", stats) == grpc.StatusCode.UNAUTHENTICATED
            assert rpc(channel, "DrainNode", drain) == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open (Kubernetes probes), reflection does not.
        health = health_pb2_grpc.HealthStub(anonymous)
        check = health.Check(
            health_pb2.HealthCheckRequest(service=config.COORDINATOR_SERVICE), timeout=10
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(anonymous)
        requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        assert (
            code_of(lambda: list(reflect.ServerReflectionInfo(requests, timeout=10)))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    finally:
        for channel in (*as_role.values(), anonymous, wrong):
            channel.close()
    # Tokens never reach the logs.
    logs = "".join(p.read_text() for p in Path(str(cluster.log_dir)).glob("*.log"))
    assert logs and not any(token in logs for token in cluster.tokens.values())


def test_agents_accept_only_the_node_token(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(1, auth=True)
    client = CoordinatorClient(cluster.coordinator_address, security=cluster.client_security())
    try:
        agent_address = client.nodes()[0].address
    finally:
        client.close()
    request = node_agent_pb2.GetLoadRequest()
    for token, expected in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        # Agents know only the node token: any other is unknown to them.
        (cluster.tokens["client"], grpc.StatusCode.UNAUTHENTICATED),
        (cluster.tokens["admin"], grpc.StatusCode.UNAUTHENTICATED),
        (cluster.tokens["node"], grpc.StatusCode.OK),
    ):
        channel = ChannelSecurity(token=token).sync_channel(agent_address)
        try:
            load = node_agent_pb2_grpc.NodeAgentStub(channel).GetLoad
            assert code_of(lambda: load(request, timeout=10)) == expected, token  # noqa: B023
        finally:
            channel.close()
    # ...while the coordinator, holding the node token, keeps routing to it.
    assert len(generate(cluster.client_security().sync_channel(cluster.coordinator_address)))


def _intruder(cluster: LocalCluster, tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """An agent started by hand, outside the cluster's token handling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_")}
    log = open(tmp_path / "intruder.log", "wb")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node_agent",
            "--coordinator",
            cluster.coordinator_address,
            "--node-id",
            "intruder",
            "--log-format",
            "json",
            *FAST_SIM,
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.parametrize(
    ("credentials", "code"),
    [
        ("none", "UNAUTHENTICATED"),
        ("wrong", "UNAUTHENTICATED"),
        ("client", "PERMISSION_DENIED"),
    ],
)
def test_a_node_without_the_node_token_cannot_join(
    make_cluster: MakeCluster, tmp_path: Path, credentials: str, code: str
) -> None:
    cluster = make_cluster(1, auth=True)
    token_file = tmp_path / "token"
    token_file.write_text("guess\n" if credentials == "wrong" else cluster.tokens["client"])
    extra = ["--auth", "off"]  # its own server unprotected: what matters is the join
    if credentials != "none":
        extra += ["--node-token-file", str(token_file)]
    process = _intruder(cluster, tmp_path, *extra)
    try:
        wait_until(
            lambda: f'"code": "{code}"' in (tmp_path / "intruder.log").read_text(),
            30,
            f"the intruder's join refused with {code}",
        )
        assert process.poll() is None  # it keeps trying, as a real agent would
        assert node_ids(cluster) == ["node-0"]
    finally:
        process.terminate()
        process.wait(15)


def test_auth_required_without_tokens_fails_at_start_up() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_")}
    done = subprocess.run(
        [sys.executable, "-m", "coordinator", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 2
    assert "auth is required but no token is configured" in done.stderr
    assert "--auth off" in done.stderr


def test_cli_with_token_file_and_env(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(1, auth=True)
    address = cluster.coordinator_address
    token_file = str(cluster.token_file("admin"))
    assert omni("status", "--coordinator", address, "--token-file", token_file).returncode == 0
    refused = omni("status", "--coordinator", address)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    drained = omni(
        "drain",
        "node-0",
        "--coordinator",
        address,
        "--token-file",
        str(cluster.token_file("client")),
    )
    assert drained.returncode == 1 and "PERMISSION_DENIED" in drained.stderr


# -- node identity --------------------------------------------------------------------------


def test_a_healthy_node_id_cannot_be_taken_over(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(2)
    client = CoordinatorClient(cluster.coordinator_address)

    def node(node_id: str) -> coordinator_pb2.NodeInfo:
        return next(n for n in client.nodes() if n.node_id == node_id)

    try:
        original = node("node-0").address
        # A second process claims node-0 from another address.
        impostor = cluster.start_agent(2, extra=["--node-id", "node-0"])
        wait_until(
            lambda: "held by a healthy node" in impostor.log_path.read_text(),
            30,
            "the impostor refused",
        )
        assert node("node-0").address == original
        assert node("node-0").state == coordinator_pb2.NODE_STATE_HEALTHY
        channel = grpc.insecure_channel(cluster.coordinator_address)
        served = {r.node_id for _ in range(4) for r in generate(channel)[-1:]}
        channel.close()
        assert served == {"node-0", "node-1"}
        # Stopping the impostor (it leaves on SIGTERM) does not remove the real node-0.
        impostor.process.send_signal(signal.SIGTERM)
        impostor.process.wait(15)
        assert node("node-0").address == original
        assert node("node-0").state == coordinator_pb2.NODE_STATE_HEALTHY

        # The real node-0 restarting (a new port) takes its id back once the old one is gone.
        cluster.agents[0].process.kill()
        cluster.agents[0].process.wait(15)
        cluster.start_agent(0)
        wait_until(
            lambda: (
                node("node-0").address != original
                and node("node-0").state == coordinator_pb2.NODE_STATE_HEALTHY
            ),
            30,
            "the restarted node-0 healthy at its new address",
        )
    finally:
        client.close()


def test_health_only_port_for_probes(make_cluster: MakeCluster) -> None:
    """--health-listen: plaintext grpc.health.v1 alone, for probes that carry no credentials."""
    port = free_port()
    cluster = make_cluster(
        1,
        auth=True,
        coordinator_args=["--health-listen", f"127.0.0.1:{port}", "--health-auth", "token"],
    )
    probe = grpc.insecure_channel(f"127.0.0.1:{port}")
    main = grpc.insecure_channel(cluster.coordinator_address)
    try:
        request = health_pb2.HealthCheckRequest(service=config.COORDINATOR_SERVICE)
        status = health_pb2_grpc.HealthStub(probe).Check(request, timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        # The main port wants a token for health here; the probe port offers nothing else.
        main_check = health_pb2_grpc.HealthStub(main).Check
        assert code_of(lambda: main_check(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: generate(probe)) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        probe.close()
        main.close()
