"""Structured logs of real processes: JSON lines, ids on request lines, state changes once.

The requirement (issue 5): structlog everywhere, JSON when not on a terminal and readable
console output on one; every line about a request carries ``request_id`` and ``node_id``; node
state changes and failovers are logged once at INFO with the reason; no prompt text in the logs
unless the coordinator runs with ``--log-prompts``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk.client import CoordinatorClient, node_dict
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2
from tests.conftest import read_pty, wait_until

MakeCluster = Callable[..., LocalCluster]
Line = dict[str, Any]

SECRET = "the distinctive prompt zqxjv-7741"
SLOW_SIM = ["--sim-ttft-ms", "5", "--sim-itl-ms", "20"]
FAST_SIM = ["--sim-ttft-ms", "1", "--sim-itl-ms", "1"]
COORDINATOR_ARGS = ["--health-check-timeout", "0.5"]
# Events that are about one request: each must name the request and the node.
REQUEST_EVENTS = {
    "request finished",
    "request failed",
    "attempt failed, failing over",
    "engine failed the request",
    "request aborted",
    "cancel received",
}


def read_log(path: Path) -> list[Line]:
    """Every line of a process's log, each of which must be a JSON object."""
    lines: list[Line] = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name}:{number} is not JSON: {text!r}") from None
        assert isinstance(entry, dict), f"{path.name}:{number} is not an object: {text!r}"
        for key in ("event", "level", "timestamp"):
            assert key in entry, f"{path.name}:{number} has no {key!r}: {text!r}"
        lines.append(entry)
    return lines


def cluster_logs(cluster: LocalCluster) -> dict[str, list[Line]]:
    assert cluster.coordinator is not None
    children = [cluster.coordinator, *cluster.agents]
    return {child.name: read_log(child.log_path) for child in children}


def has_line(cluster: LocalCluster, name: str, **fields: object) -> bool:
    """Whether process ``name``'s log has a line with all of ``fields`` (JSON or not yet)."""
    path = next(c.log_path for c in (cluster.coordinator, *cluster.agents) if c and c.name == name)
    for text in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(text)
            if all(entry.get(k) == v for k, v in fields.items()):
                return True
    return False


def node_info(cluster: LocalCluster, node_id: str) -> dict[str, Any]:
    client = CoordinatorClient(cluster.coordinator_address)
    try:
        return next(node_dict(n) for n in client.nodes() if n.node_id == node_id)
    finally:
        client.close()


def state_of(cluster: LocalCluster, node_id: str) -> str:
    return str(node_info(cluster, node_id)["state"])


def request(request_id: str, prompt: str, max_tokens: int, **extra: Any) -> Any:
    message = generate_pb2.GenerateRequest(request_id=request_id, prompt=prompt, **extra)
    message.sampling.max_tokens = max_tokens
    message.sampling.seed = 3
    return message


def assert_request_lines_have_ids(logs: dict[str, list[Line]]) -> int:
    """Every request line names its request and node; agents' lines name their own node."""
    checked = 0
    for name, lines in logs.items():
        for entry in lines:
            if name != "coordinator":
                assert entry.get("node_id") == name, f"{name}: line without its node_id: {entry}"
            if entry["event"] in REQUEST_EVENTS or "request_id" in entry:
                assert entry.get("request_id"), f"{name}: request line without request_id: {entry}"
                assert entry.get("node_id"), f"{name}: request line without node_id: {entry}"
                checked += 1
    return checked


def state_changes(lines: list[Line], node_id: str) -> list[Line]:
    return [e for e in lines if e["event"] == "node state changed" and e["node_id"] == node_id]


async def test_json_logs_ids_state_changes_and_failover(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        2,
        agent_args=SLOW_SIM,
        coordinator_args=COORDINATOR_ARGS,
        strategy="round_robin",
        log_format="json",
    )
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        # Plain requests on both nodes.
        for i in range(4):
            async for _ in stub.Generate(request(f"plain-{i}", f"{SECRET} {i}", 4), timeout=30):
                pass

        # A stream whose node's engine dies after 10 tokens: failed over, resumed elsewhere.
        victims: list[str] = []
        tokens = 0
        last = generate_pb2.GenerateResponse()
        async for response in stub.Generate(request("failover-1", SECRET, 60), timeout=60):
            tokens += len(response.token_ids)
            if tokens >= 10 and not victims:
                victims.append(response.node_id)
                os.kill(cluster.agents[int(response.node_id[-1])].process.pid, signal.SIGUSR1)
            last = response
        assert victims and last.node_id != victims[0] and last.attempt == 2
        victim = victims[0]
        survivor = last.node_id
        wait_until(lambda: state_of(cluster, victim) == "unhealthy", 5, f"{victim} unhealthy")
        os.kill(cluster.agents[int(victim[-1])].process.pid, signal.SIGUSR1)  # engine back
        wait_until(lambda: state_of(cluster, victim) == "healthy", 10, f"{victim} healthy again")

        # A request the client gives up on: the agent aborts it.
        with pytest.raises(grpc.aio.AioRpcError) as gave_up:
            async for _ in stub.Generate(request("deadline-1", SECRET, 500), timeout=0.3):
                pass
        assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    # Lines are written as they happen; wait for the last ones of each kind to land.
    wait_until(
        lambda: has_line(cluster, "coordinator", event="request finished", request_id="deadline-1"),
        10,
        "the abandoned request's coordinator line",
    )
    wait_until(
        lambda: any(
            has_line(cluster, node, event="request aborted", request_id="deadline-1")
            for node in ("node-0", "node-1")
        ),
        10,
        "the abandoned request's agent line",
    )

    # Now the victim's process is killed: unhealthy, logged once however many probes then fail.
    os.kill(cluster.agents[int(victim[-1])].process.pid, signal.SIGKILL)
    wait_until(lambda: state_of(cluster, victim) == "unhealthy", 5, f"killed {victim} unhealthy")
    probes = {float(node_info(cluster, victim)["last_health_check_at"])}

    def probed_twice_more() -> bool:
        probes.add(float(node_info(cluster, victim)["last_health_check_at"]))
        return len(probes) >= 3

    wait_until(probed_twice_more, 10, f"two more (failing) probes of the killed {victim}")

    logs = cluster_logs(cluster)  # every line of every process parses as JSON
    coordinator = logs["coordinator"]

    assert assert_request_lines_have_ids(logs) >= 8
    finished = {e["request_id"]: e for e in coordinator if e["event"] == "request finished"}
    assert set(finished) == {"plain-0", "plain-1", "plain-2", "plain-3", "failover-1", "deadline-1"}
    assert {finished[f"plain-{i}"]["node_id"] for i in range(4)} == {"node-0", "node-1"}
    assert finished["failover-1"]["node_id"] == survivor
    assert finished["failover-1"]["status"] == "OK" and finished["failover-1"]["attempts"] == 2

    # The failover: logged once, at INFO, naming the request, the failed node and why.
    failovers = [e for e in coordinator if e["event"] == "attempt failed, failing over"]
    assert len(failovers) == 1, failovers
    failover = failovers[0]
    assert failover["level"] == "info"
    assert failover["request_id"] == "failover-1" and failover["node_id"] == victim
    assert "INTERNAL" in failover["reason"] and failover["resume_after_tokens"] >= 10
    # The agent's side of it carries the same ids.
    assert has_line(cluster, victim, event="engine failed the request", request_id="failover-1")

    # Each state change of the faulted node: exactly once, at INFO, with a reason.
    changes = state_changes(coordinator, victim)
    assert [(e["old_state"], e["new_state"]) for e in changes] == [
        ("joining", "healthy"),
        ("healthy", "unhealthy"),
        ("unhealthy", "healthy"),
        ("healthy", "unhealthy"),
    ], changes
    assert all(e["level"] == "info" and e["reason"] for e in changes), changes
    assert "NOT_SERVING" in changes[1]["reason"]
    assert "passing health checks" in changes[2]["reason"]
    assert "UNAVAILABLE" in changes[3]["reason"] or "ended" in changes[3]["reason"], changes
    assert [(e["old_state"], e["new_state"]) for e in state_changes(coordinator, survivor)] == [
        ("joining", "healthy")
    ]

    # No prompt text anywhere without --log-prompts (raw text: not even in a field we missed).
    for child in (cluster.coordinator, *cluster.agents):
        assert child is not None
        assert "zqxjv" not in child.log_path.read_text(), f"prompt text in {child.name}'s log"


async def test_prompts_are_logged_only_with_log_prompts(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        1, agent_args=FAST_SIM, coordinator_args=["--log-prompts"], log_format="json"
    )
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        async for _ in stub.Generate(request("asked-1", SECRET, 4), timeout=30):
            pass
    wait_until(
        lambda: has_line(cluster, "coordinator", event="request finished", request_id="asked-1"),
        10,
        "the request's line",
    )
    logs = cluster_logs(cluster)
    finished = [e for e in logs["coordinator"] if e["event"] == "request finished"]
    assert [e["prompt"] for e in finished] == [SECRET]
    # The coordinator's flag is the coordinator's: agents still keep prompts out of their logs.
    assert SECRET not in cluster.agents[0].log_path.read_text()


async def test_a_failed_request_is_logged_with_its_ids(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        2,
        agent_args=[*FAST_SIM, "--sim-fault", "fail_requests"],
        coordinator_args=[*COORDINATOR_ARGS, "--breaker-failures", "1000"],
        log_format="json",
    )
    async with grpc.aio.insecure_channel(cluster.coordinator_address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in stub.Generate(request("doomed-1", SECRET, 4, max_retries=1), timeout=30):
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(
        lambda: has_line(cluster, "coordinator", event="request finished", request_id="doomed-1"),
        10,
        "the failed request's line",
    )
    logs = cluster_logs(cluster)
    finished = [e for e in logs["coordinator"] if e["event"] == "request finished"]
    assert len(finished) == 1 and finished[0]["status"] == "UNAVAILABLE"
    assert "after 2 attempt(s)" in finished[0]["error"]
    assert_request_lines_have_ids(logs)


# -- auto: JSON on a pipe, console on a terminal ---------------------------------------------


def coordinator_argv(port_file: Path) -> list[str]:
    # No --log-format: the default is "auto". (Loopback only: no tokens needed.)
    return [
        sys.executable,
        "-m",
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--port-file",
        str(port_file),
        "--auth",
        "off",
    ]


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_auto_format_is_json_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    process = subprocess.Popen(
        coordinator_argv(tmp_path / "port"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (tmp_path / "port").exists() or process.poll() is not None, 30, "port")
    finally:
        stop(process)
    _, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    lines = [json.loads(text) for text in err.splitlines()]  # every line is JSON
    events = [entry["event"] for entry in lines]
    assert "coordinator serving" in events and "coordinator stopped" in events
    assert all(entry["level"] == "info" for entry in lines)


def test_auto_format_is_readable_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    process = subprocess.Popen(
        coordinator_argv(tmp_path / "port"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "TERM": "xterm-256color"},
    )
    os.close(slave)
    chunks, reader = read_pty(master)
    try:
        wait_until(lambda: b"coordinator serving" in b"".join(chunks), 30, "the serving line")
    finally:
        stop(process)
        reader.join(5)
        os.close(master)
    assert process.returncode == 0
    text = b"".join(chunks).decode(errors="replace")
    serving = next(line for line in text.splitlines() if "coordinator serving" in line)
    with pytest.raises(json.JSONDecodeError):
        json.loads(serving)
    # structlog's console renderer, coloured on a terminal:
    # "<time> [info     ] coordinator serving  address=... strategy=round_robin"
    assert "\x1b[" in serving, repr(serving)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", serving)
    assert re.search(r"\[info\s*\] coordinator serving\s.*\bstrategy=round_robin\b", plain), plain
