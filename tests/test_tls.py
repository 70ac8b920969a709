"""Mutual TLS on real processes (issue 7, items 2 and 3).

A coordinator and agents on loopback, each with its own certificate from a CA made at run
time (tests/certs.py), all with ``--require-client-cert``: clients with a certificate are
served (SDK and ``omni status``); clients without one, plaintext clients and clients of
another CA are refused at the handshake; agents with a certificate from another CA, or one
naming another node, cannot join; the coordinator's certificate is reloaded without a
restart; and inconsistent TLS flags stop a server at start-up naming the flag.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from omni_rpc.launchers.local import Child, LocalCluster
from omni_rpc.sdk import DistributedOrchestrator
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.security import ChannelSecurity, TlsFiles
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.certs import CertFiles, CertificateAuthority, serial_of_der
from tests.conftest import FAST_SIM, wait_until

NODES = ("node-0", "node-1")


@dataclass(frozen=True)
class Pki:
    """The cluster's CA and certificates, and an unrelated CA with its own certificates."""

    ca: CertificateAuthority
    coordinator: CertFiles
    nodes: dict[str, CertFiles]
    client: CertFiles
    other_ca: CertificateAuthority
    other_node: CertFiles
    other_client: CertFiles

    def client_tls(self, files: CertFiles | None = None) -> TlsFiles:
        files = files or self.client
        return TlsFiles(str(files.cert), str(files.key), str(self.ca.cert_path))

    def client_security(self) -> ChannelSecurity:
        return ChannelSecurity(tls=self.client_tls())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path / "pki", "omni-test-ca")
    other = CertificateAuthority(tmp_path / "other-pki", "other-ca")
    return Pki(
        ca=ca,
        # Dialed as 127.0.0.1:PORT by agents and clients: the IP SAN is what they verify.
        coordinator=ca.issue("coordinator", "omni-coordinator"),
        # Agents are dialed by the coordinator at their advertised 127.0.0.1:PORT, and their
        # certificate names their node id (CN and a DNS SAN).
        nodes={n: ca.issue(n, n, dns=(n, "localhost")) for n in NODES},
        client=ca.issue("client", "test-client", dns=(), ips=()),
        other_ca=other,
        # Names node-2, as the agent started with it is called: only the CA is wrong.
        other_node=other.issue("node-2", "node-2", dns=("node-2", "localhost")),
        other_client=other.issue("client", "test-client", dns=(), ips=()),
    )


def tls_flags(files: CertFiles) -> list[str]:
    return ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]


def log_events(child: Child) -> list[dict[str, Any]]:
    """The JSON log lines of a child process (gRPC's own C-core lines are skipped)."""
    events = []
    for line in child.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
                pass
    return events


def events_named(child: Child, event: str) -> list[dict[str, Any]]:
    return [e for e in log_events(child) if e.get("event") == event]


def cluster_view(address: str, pki: Pki) -> tuple[list[str], list[str]]:
    """(healthy node ids, every node id) as the coordinator reports them, over mutual TLS."""
    client = CoordinatorClient(address, timeout_s=5.0, security=pki.client_security())
    try:
        healthy = sorted(client.stats().healthy_nodes)
        known = sorted(n.node_id for n in client.nodes())
        return healthy, known
    finally:
        client.close()


def start_mtls_cluster(
    make_cluster: Callable[..., LocalCluster], pki: Pki, agents: Sequence[CertFiles]
) -> LocalCluster:
    """A coordinator and agents node-0, node-1... (with these certificates), all mutual TLS;
    returns once every agent is healthy."""
    cluster = make_cluster(
        len(agents),
        wait=False,  # conftest's wait dials without a certificate, which this cluster refuses
        strategy="round_robin",
        coordinator_args=[
            *tls_flags(pki.coordinator),
            "--tls-ca",
            str(pki.ca.cert_path),
            "--require-client-cert",
        ],
        agent_args=[*FAST_SIM, "--tls-ca", str(pki.ca.cert_path), "--require-client-cert"],
        per_agent_args={i: tls_flags(files) for i, files in enumerate(agents)},
    )
    names = [f"node-{i}" for i in range(len(agents))]

    def all_healthy() -> bool:
        cluster.check_alive()
        return cluster_view(cluster.coordinator_address, pki)[0] == names

    wait_until(all_healthy, 30.0, f"{', '.join(names)} healthy over mutual TLS")
    return cluster


@pytest.fixture
def mtls_cluster(make_cluster: Callable[..., LocalCluster], pki: Pki) -> LocalCluster:
    """A coordinator and node-0, node-1, all mutual TLS, both nodes healthy."""
    return start_mtls_cluster(make_cluster, pki, [pki.nodes[n] for n in NODES])


async def served_by(cluster: LocalCluster, pki: Pki, requests: int) -> list[str]:
    """Send ``requests`` generations one after another through the SDK (mutual TLS);
    return the node that served each."""
    nodes = []
    async with DistributedOrchestrator(
        coordinator=cluster.coordinator_address, tls=pki.client_tls(), timeout=20.0
    ) as orch:
        for i in range(requests):
            result = await orch.generate_one(f"prompt {i}", max_tokens=6, temperature=0.0)
            assert result.text and result.usage["completion_tokens"] == 6, result
            nodes.append(result.node_id)
    return nodes


def omni(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``omni`` command line, as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "omni_rpc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def expect_refused(what: str, channel: grpc.Channel) -> None:
    """Both a streaming Generate and a unary GetStats fail UNAVAILABLE on ``channel``."""
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    request = generate_pb2.GenerateRequest(
        prompt="hello", sampling=generate_pb2.SamplingParams(max_tokens=4)
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (what, info.value)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetStats(coordinator_pb2.GetStatsRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (what, info.value)


# -- 1. an mTLS cluster serves clients with a certificate ------------------------------------


async def test_mtls_cluster_serves_sdk_and_omni_status(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    # Round robin over both agents: the coordinator dials each of them over mutual TLS.
    assert sorted(set(await served_by(mtls_cluster, pki, 4))) == list(NODES)

    assert mtls_cluster.coordinator is not None
    serving = events_named(mtls_cluster.coordinator, "coordinator serving")
    assert serving and serving[0]["tls"] == "mutual", serving

    address = mtls_cluster.coordinator_address
    tls = pki.client_tls()
    status = await asyncio.to_thread(
        omni,
        "status",
        "--json",
        "--coordinator",
        address,
        "--tls-ca",
        str(tls.ca),
        "--tls-cert",
        str(tls.cert),
        "--tls-key",
        str(tls.key),
    )
    assert status.returncode == 0, status.stderr
    stats = json.loads(status.stdout)
    assert sorted(stats["healthy_nodes"]) == list(NODES), stats
    assert stats["requests_succeeded"] >= 4, stats

    # The same command without the TLS flags dials in plaintext and is refused.
    plain = await asyncio.to_thread(omni, "status", "--coordinator", address)
    assert plain.returncode == 1, (plain.stdout, plain.stderr)
    assert "unreachable" in plain.stderr, plain.stderr


# -- 2. clients without a valid certificate are refused at the handshake ---------------------


def test_clients_without_a_valid_certificate_are_refused(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    address = mtls_cluster.coordinator_address
    requests_before = _requests_total(address, pki)
    refused: dict[str, grpc.Channel] = {
        # Trusts the server, presents no certificate.
        "no client certificate": ChannelSecurity(
            tls=TlsFiles(ca=str(pki.ca.cert_path))
        ).sync_channel(address),
        "plaintext": grpc.insecure_channel(address),
        # A certificate, but from a CA the coordinator does not trust.
        "certificate from another CA": ChannelSecurity(
            tls=TlsFiles(
                str(pki.other_client.cert), str(pki.other_client.key), str(pki.ca.cert_path)
            )
        ).sync_channel(address),
    }
    try:
        for what, channel in refused.items():
            expect_refused(what, channel)
    finally:
        for channel in refused.values():
            channel.close()

    # Nothing reached the coordinator's services, and it keeps serving clients with a
    # certificate on both nodes.
    assert _requests_total(address, pki) == requests_before
    mtls_cluster.check_alive()
    assert cluster_view(address, pki)[0] == list(NODES)


async def test_refused_clients_do_not_disturb_the_cluster(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    address = mtls_cluster.coordinator_address
    async with grpc.aio.insecure_channel(address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await coordinator_pb2_grpc.CoordinatorStub(plain).GetStats(
                coordinator_pb2.GetStatsRequest(), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    async with ChannelSecurity(tls=TlsFiles(ca=str(pki.ca.cert_path))).aio_channel(
        address
    ) as anonymous:
        call = coordinator_pb2_grpc.CoordinatorStub(anonymous).Generate(
            generate_pb2.GenerateRequest(
                prompt="hello", sampling=generate_pb2.SamplingParams(max_tokens=4)
            ),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sorted(set(await served_by(mtls_cluster, pki, 2))) == list(NODES)


def _requests_total(address: str, pki: Pki) -> int:
    client = CoordinatorClient(address, timeout_s=5.0, security=pki.client_security())
    try:
        return client.stats().requests_total
    finally:
        client.close()


# -- 3. agents that may not join -------------------------------------------------------------


def _never_joins(
    cluster: LocalCluster, pki: Pki, agent: Child, event: str, attempts: int
) -> list[dict[str, Any]]:
    """Wait until ``agent`` logged ``event`` ``attempts`` times (it keeps trying), checking
    on every poll that the coordinator never lists it."""

    def failed_enough() -> list[dict[str, Any]]:
        assert agent.alive, f"{agent.name} exited:\n{agent.log_tail()}"
        known = cluster_view(cluster.coordinator_address, pki)[1]
        assert known == list(NODES), f"{agent.name} joined: {known}"
        failures = events_named(agent, event)
        return failures if len(failures) >= attempts else []

    failures: list[dict[str, Any]] = wait_until(
        failed_enough, 30.0, f"{attempts} x {event!r} in {agent.name}'s log"
    )
    return failures


async def test_agent_with_a_certificate_from_another_ca_cannot_join(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    # It trusts the right CA (so it can verify the coordinator), but its own certificate is
    # from another one: the coordinator refuses the handshake.
    intruder = mtls_cluster.start_agent(
        2,
        extra=[
            *tls_flags(pki.other_node),
            "--tls-ca",
            str(pki.ca.cert_path),
            "--require-client-cert",
        ],
    )
    failures = _never_joins(
        mtls_cluster, pki, intruder, "cannot join the coordinator, retrying", attempts=3
    )
    assert all(f["code"] == "UNAVAILABLE" for f in failures), failures
    assert not events_named(intruder, "joined the coordinator")
    assert sorted(set(await served_by(mtls_cluster, pki, 4))) == list(NODES)


async def test_agent_whose_certificate_names_another_node_cannot_join(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    # A valid certificate from the cluster's CA, but node-1's: it may not join as node-2.
    impostor = mtls_cluster.start_agent(
        2,
        extra=[
            *tls_flags(pki.nodes["node-1"]),
            "--tls-ca",
            str(pki.ca.cert_path),
            "--require-client-cert",
        ],
    )
    refusals = _never_joins(
        mtls_cluster, pki, impostor, "coordinator refused the join, retrying", attempts=2
    )
    for refusal in refusals:
        assert "node-2" in refusal["reason"] and "certificate" in refusal["reason"], refusal
    coordinator = mtls_cluster.coordinator
    assert coordinator is not None
    refused = [e for e in events_named(coordinator, "join refused") if e["node_id"] == "node-2"]
    assert refused and "certificate" in refused[0]["reason"], refused

    # The same, called directly: node-1's certificate cannot re-register node-0, nor make
    # node-0 leave.
    async with ChannelSecurity(tls=pki.client_tls(pki.nodes["node-1"])).aio_channel(
        mtls_cluster.coordinator_address
    ) as channel:
        registry = registry_pb2_grpc.RegistryStub(channel)
        answer = await registry.Join(
            registry_pb2.JoinRequest(
                node_id="node-0", address="127.0.0.1:1", model="sim", engine="sim", capacity=1
            ),
            timeout=10,
        )
        assert not answer.accepted
        assert "does not match the client certificate" in answer.reason, answer.reason
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry.Leave(
                registry_pb2.LeaveRequest(node_id="node-0", reason="evicted by node-1"),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "certificate" in (info.value.details() or "")

    assert cluster_view(mtls_cluster.coordinator_address, pki) == (list(NODES), list(NODES))
    assert sorted(set(await served_by(mtls_cluster, pki, 4))) == list(NODES)


async def test_agent_whose_certificate_lacks_its_address_is_never_dispatched_to(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    # The right CA and the right name, but no IP SAN for the 127.0.0.1:PORT it advertises:
    # it joins, yet the coordinator cannot verify it when dialing it, so it never turns
    # healthy and gets no work.
    unverifiable = pki.ca.issue("node-2", "node-2", dns=("node-2",), ips=())
    mtls_cluster.start_agent(
        2,
        extra=[
            *tls_flags(unverifiable),
            "--tls-ca",
            str(pki.ca.cert_path),
            "--require-client-cert",
        ],
    )

    def failing_checks() -> str:
        client = CoordinatorClient(
            mtls_cluster.coordinator_address, timeout_s=5.0, security=pki.client_security()
        )
        try:
            node = next((n for n in client.nodes() if n.node_id == "node-2"), None)
        finally:
            client.close()
        if node is None or node.state != coordinator_pb2.NODE_STATE_UNHEALTHY:
            assert node is None or node.state == coordinator_pb2.NODE_STATE_JOINING, node
            return ""
        return node.state_reason if "UNAVAILABLE" in node.state_reason else ""

    reason = wait_until(failing_checks, 30.0, "node-2 listed, unhealthy: its checks fail TLS")
    # Whichever of the node's two health calls (Watch, Check) fails first names the cause.
    assert "health check failed" in reason or "health watch stream broke" in reason, reason
    assert sorted(set(await served_by(mtls_cluster, pki, 4))) == list(NODES)
    assert cluster_view(mtls_cluster.coordinator_address, pki)[0] == list(NODES)


# -- 4. certificate reload without restart ---------------------------------------------------


def peer_certificate_serial(address: str, pki: Pki) -> int:
    """The serial of the certificate the server at ``address`` presents on a new connection,
    verified against the cluster's CA (IP SAN included), with our client certificate."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca.cert_path)
    context.load_cert_chain(pki.client.cert, pki.client.key)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        assert tls.selected_alpn_protocol() == "h2"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return serial_of_der(der)


async def test_coordinator_certificate_is_reloaded_without_restart(
    mtls_cluster: LocalCluster, pki: Pki
) -> None:
    coordinator = mtls_cluster.coordinator
    assert coordinator is not None
    address = mtls_cluster.coordinator_address
    pid = coordinator.process.pid
    assert peer_certificate_serial(address, pki) == pki.coordinator.serial

    renewed = pki.ca.issue("coordinator", "omni-coordinator", replace=pki.coordinator)
    assert renewed.serial != pki.coordinator.serial
    wait_until(
        lambda: peer_certificate_serial(address, pki) == renewed.serial,
        10.0,
        "the coordinator to present its new certificate on a new connection",
    )
    assert coordinator.alive and coordinator.process.pid == pid
    assert events_named(coordinator, "TLS certificate reloaded")
    # New connections (a new SDK client) verify the new certificate and are served, and the
    # agents, whose connections predate it, are still healthy.
    assert sorted(set(await served_by(mtls_cluster, pki, 4))) == list(NODES)
    assert cluster_view(address, pki)[0] == list(NODES)

    # A certificate file that cannot be loaded (a botched renewal) keeps the last good one.
    broken = pki.coordinator.cert.with_name("broken.tmp")
    broken.write_text("not a certificate\n")
    broken.replace(pki.coordinator.cert)
    for _ in range(3):
        assert peer_certificate_serial(address, pki) == renewed.serial
    assert coordinator.alive and coordinator.process.pid == pid
    assert sorted(set(await served_by(mtls_cluster, pki, 2))) == list(NODES)

    fixed = pki.ca.issue("coordinator", "omni-coordinator", replace=pki.coordinator)
    wait_until(
        lambda: peer_certificate_serial(address, pki) == fixed.serial,
        10.0,
        "the coordinator to present the repaired certificate",
    )
    assert coordinator.alive and coordinator.process.pid == pid


def test_agent_presents_its_renewed_certificate_when_it_reconnects(
    make_cluster: Callable[..., LocalCluster], pki: Pki
) -> None:
    short_lived = pki.ca.issue(
        "node-0-short",
        "node-0",
        dns=("node-0", "localhost"),
        valid_for=datetime.timedelta(seconds=6),
    )
    cluster = start_mtls_cluster(make_cluster, pki, [short_lived])
    # Renewed in place (as cert-manager does), well before it expires.
    pki.ca.issue("node-0", "node-0", dns=("node-0", "localhost"), replace=short_lived)
    wait_until(
        lambda: (
            datetime.datetime.now(datetime.UTC)
            > short_lived.not_valid_after + datetime.timedelta(seconds=1)
        ),
        10.0,
        "the first certificate to expire",
    )
    # The agent must open a new connection to re-join: it should present the renewed
    # certificate, which the new coordinator accepts.
    cluster.restart_coordinator()

    def rejoined() -> bool:
        cluster.check_alive()
        return cluster_view(cluster.coordinator_address, pki)[0] == ["node-0"]

    wait_until(rejoined, 10.0, "node-0 to re-join the restarted coordinator")


# -- 5. bad TLS configuration fails at start-up, naming the flag -----------------------------


def start_server(component: str, flags: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Start ``python -m coordinator`` or ``python -m node_agent`` with ``flags``; a server
    that starts anyway runs into the timeout, which fails the test."""
    argv = [sys.executable, "-m", component, "--listen", "127.0.0.1:0", "--auth", "off"]
    if component == "node_agent":
        # Nothing listens on port 1: it never gets as far as joining anyway.
        argv += ["--coordinator", "127.0.0.1:1", "--engine", "sim"]
    return subprocess.run(
        [*argv, *flags, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def _bad_flag_cases() -> list[Any]:
    cases = []
    for component in ("coordinator", "node_agent"):
        cases += [
            pytest.param(component, ["cert"], "--tls-key", id=f"{component}-cert-without-key"),
            pytest.param(component, ["key"], "--tls-cert", id=f"{component}-key-without-cert"),
            pytest.param(
                component,
                ["cert", "key", "--require-client-cert"],
                "--tls-ca",
                id=f"{component}-require-client-cert-without-ca",
            ),
            pytest.param(
                component,
                ["--require-client-cert", "--tls-ca", "ca"],
                "--tls-cert",
                id=f"{component}-require-client-cert-without-cert",
            ),
            pytest.param(
                component,
                ["--tls-cert", "missing", "key"],
                "--tls-cert",
                id=f"{component}-missing-cert-file",
            ),
            pytest.param(
                component,
                ["cert", "key", "--tls-ca", "missing"],
                "--tls-ca",
                id=f"{component}-missing-ca-file",
            ),
        ]
    return cases


def _expand(flags: Sequence[str], pki: Pki, tmp_path: Path) -> list[str]:
    names = {
        "cert": ["--tls-cert", str(pki.coordinator.cert)],
        "key": ["--tls-key", str(pki.coordinator.key)],
        "ca": [str(pki.ca.cert_path)],
        "missing": [str(tmp_path / "no-such.pem")],
    }
    return [arg for flag in flags for arg in names.get(flag, [flag])]


@pytest.mark.parametrize(("component", "flags", "named"), _bad_flag_cases())
def test_bad_tls_flags_fail_at_start_up(
    pki: Pki,
    tmp_path: Path,
    component: str,
    flags: list[str],
    named: str,
) -> None:
    result = start_server(component, _expand(flags, pki, tmp_path))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    error_line = result.stderr.strip().splitlines()[-1]
    assert "error:" in error_line and named in error_line, result.stderr[-2000:]


@pytest.mark.parametrize("component", ["coordinator", "node_agent"])
@pytest.mark.parametrize("bad", ["garbage-cert", "mismatched-key"])
def test_unusable_tls_files_fail_at_start_up_naming_the_flag(
    pki: Pki,
    tmp_path: Path,
    component: str,
    bad: str,
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key, named = {
        "garbage-cert": (garbage, pki.coordinator.key, "--tls-cert"),
        "mismatched-key": (pki.coordinator.cert, pki.client.key, "--tls-key"),
    }[bad]
    result = start_server(component, ["--tls-cert", str(cert), "--tls-key", str(key)])
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert named in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
