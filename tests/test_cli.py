"""The ``omni`` command line, run as real processes: up, status, generate, Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node_agent.engine import ChatTurn
from node_agent.engines.sim import simulate
from omni_rpc.cli.main import format_status
from omni_rpc.sdk.client import node_dict
from omni_rpc.v1 import coordinator_pb2
from tests.conftest import wait_until

OMNI = [sys.executable, "-m", "omni_rpc"]
FAST_SIM_FLAGS = ["--health-check-interval", "0.5", "--sim-ttft-ms", "5", "--sim-itl-ms", "2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def omni(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OMNI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def omni_up_running(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``omni up ARGS`` in the background; Ctrl-C (SIGINT) when the block ends, which must
    stop it cleanly (exit 0)."""
    process = subprocess.Popen(
        [*OMNI, "up", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.wait(60)
    assert process.returncode == 0, process.communicate()[1]


def wait_healthy_nodes(
    process: subprocess.Popen[str], address: str, count: int, timeout: float, *auth: str
) -> list[dict[str, Any]]:
    """``omni nodes --json`` once ``count`` nodes are healthy (fails if omni up exits)."""

    def healthy() -> list[dict[str, Any]]:
        assert process.poll() is None, process.communicate()[1]
        listed = omni("nodes", "--json", "--coordinator", address, *auth)
        if listed.returncode != 0:
            return []
        nodes: list[dict[str, Any]] = json.loads(listed.stdout)
        return nodes if sum(n["state"] == "healthy" for n in nodes) == count else []

    found: list[dict[str, Any]] = wait_until(healthy, timeout, f"{count} healthy nodes")
    return found


@pytest.fixture
def omni_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """``omni up --nodes 2`` in the background; killed (with its children) at teardown."""
    address = f"127.0.0.1:{free_port()}"
    log_dir = tmp_path / "logs"
    process = subprocess.Popen(
        [
            *OMNI,
            "up",
            "--nodes",
            "2",
            "--listen",
            address,
            "--log-dir",
            str(log_dir),
            "--health-check-interval",
            "0.5",
            "--sim-ttft-ms",
            "5",
            "--sim-itl-ms",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process, address, log_dir
    finally:
        if process.poll() is None:
            # SIGTERM lets `omni up` stop its children; SIGKILL would orphan them until
            # PR_SET_PDEATHSIG fires, which it does, but only after they notice.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(ValueError):
            process.communicate(timeout=5)


def healthy_count(process: subprocess.Popen[str], address: str) -> int:
    if process.poll() is not None:
        _, err = process.communicate()
        raise AssertionError(f"omni up exited with {process.returncode}:\n{err}")
    result = omni("status", "--json", "--coordinator", address)
    if result.returncode != 0:
        return 0  # not listening yet
    return len(json.loads(result.stdout)["healthy_nodes"])


def test_up_status_generate_and_ctrl_c(
    omni_up: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, address, log_dir = omni_up
    wait_until(lambda: healthy_count(process, address) >= 2, 60, "2 healthy nodes")

    generated = omni("generate", "hello", "--max-tokens", "5", "--coordinator", address)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == simulate("hello", max_tokens=5).text + "\n"

    status = omni("status", "--coordinator", address)
    assert status.returncode == 0, status.stderr
    assert "node-0" in status.stdout and "node-1" in status.stdout
    assert "healthy" in status.stdout
    assert "2/2 nodes healthy" in status.stdout
    assert "1 succeeded" in status.stdout

    stats = json.loads(omni("status", "--json", "--coordinator", address).stdout)
    assert stats["num_nodes"] == 2
    assert sum(node["served"] for node in stats["health_stats"].values()) == 1

    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert address in out and str(log_dir) in out
    assert not accepts_connections(address), "coordinator still listening after omni up exited"
    agent_pids = sorted({int(pid) for pid in re.findall(r"\bpid (\d+)", out)})
    assert len(agent_pids) == 2, out
    assert not [pid for pid in agent_pids if alive(pid)], "agents outlived omni up"
    assert (log_dir / "node-0.log").exists() and (log_dir / "coordinator.log").exists()


def test_generate_reports_server_errors_with_their_code(
    omni_up: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, address, _ = omni_up
    wait_until(lambda: healthy_count(process, address) >= 2, 60, "2 healthy nodes")
    result = omni("generate", "hi", "--temperature", "-1", "--coordinator", address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: ")
    assert "temperature" in result.stderr
    result = omni("generate", "hi", "--max-tokens", "100000", "--coordinator", address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: RESOURCE_EXHAUSTED: ")
    assert "max_tokens_cap=8192" in result.stderr


def node_state(address: str, node_id: str) -> str:
    result = omni("status", "--json", "--coordinator", address)
    assert result.returncode == 0, result.stderr
    state: str = json.loads(result.stdout)["health_stats"][node_id]["state"]
    return state


def test_drain_nodes_and_undrain(
    omni_up: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, address, _ = omni_up
    wait_until(lambda: healthy_count(process, address) >= 2, 60, "2 healthy nodes")

    drained = omni("drain", "node-0", "--wait", "--timeout", "20", "--coordinator", address)
    assert drained.returncode == 0, drained.stderr
    assert "node-0: draining" in drained.stdout
    assert "drained, no requests in flight" in drained.stdout

    stats = json.loads(omni("status", "--json", "--coordinator", address).stdout)
    node0 = stats["health_stats"]["node-0"]
    assert node0["state"] == "draining"
    assert node0["state_reason"] == "drained by operator"
    # Draining nodes are healthy, just not taking new work (the coordinator's convention).
    assert stats["healthy_nodes"] == ["node-0", "node-1"]
    assert {"ejections", "ejected_until"} <= node0.keys()
    assert "resumes_total" in stats

    status = omni("status", "--coordinator", address)
    assert status.returncode == 0, status.stderr
    header = status.stdout.splitlines()[0].split()
    assert {"CONSEC", "EJECTIONS", "PROBED", "PROBE_MS"} <= set(header)
    assert "reason: drained by operator" in status.stdout
    assert "s ago" in status.stdout  # both nodes have been probed
    assert "2/2 nodes healthy (1 draining)" in status.stdout

    # Every request goes to the node left, and still succeeds.
    for _ in range(3):
        generated = omni("generate", "hello", "--max-tokens", "5", "-v", "--coordinator", address)
        assert generated.returncode == 0, generated.stderr
        assert generated.stdout == simulate("hello", max_tokens=5).text + "\n"
        assert generated.stderr.startswith("[node-1, "), generated.stderr

    nodes = omni("nodes", "--json", "--coordinator", address)
    assert nodes.returncode == 0, nodes.stderr
    listed = json.loads(nodes.stdout)
    assert isinstance(listed, list)
    assert [n["node_id"] for n in listed] == ["node-0", "node-1"]
    assert [n["state"] for n in listed] == ["draining", "healthy"]
    assert listed[0]["served"] == 0 and listed[1]["served"] == 3

    table = omni("nodes", "--coordinator", address)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith("NODE ")
    assert "node-0" in table.stdout and "node-1" in table.stdout
    assert "nodes healthy" not in table.stdout  # no summary

    # Draining again is idempotent, and an idle node is drained at once.
    again = omni("drain", "node-0", "--coordinator", address)
    assert again.returncode == 0, again.stderr
    assert "drained, no requests in flight" in again.stdout

    undrained = omni("undrain", "node-0", "--coordinator", address)
    assert undrained.returncode == 0, undrained.stderr
    assert undrained.stdout.startswith("node-0: healthy"), undrained.stdout
    assert node_state(address, "node-0") == "healthy"

    unknown = omni("drain", "node-9", "--coordinator", address)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("omni: ")
    assert "node-9" in unknown.stderr
    assert "node-0" in unknown.stderr and "node-1" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    assert omni("undrain", "node-9", "--coordinator", address).returncode == 1


def test_format_status_puts_details_under_their_node() -> None:
    now = 1000.0
    node = node_dict(coordinator_pb2.NodeInfo(node_id="node-0", address="127.0.0.1:1"))
    never_probed = {**node, "state": "joining"}
    failing = {
        **node,
        "node_id": "node-1",
        "state": "unhealthy",
        "state_reason": "health check failed: " + "x" * 200,
        "consecutive_failures": 3,
        "ejections": 2,
        "ejected_until": now + 4.0,
        "last_error": "UNAVAILABLE:\nconnection refused",
        "last_health_check_at": now - 2.14,
        "health_check_latency_ms": 1.25,
    }
    stats = {
        "num_nodes": 2,
        "healthy_nodes": [],
        "strategy": "least_loaded",
        "requests_total": 5,
        "requests_succeeded": 4,
        "requests_failed": 1,
        "retries_total": 2,
        "resumes_total": 1,
        "health_stats": {"node-0": never_probed, "node-1": failing},
    }
    lines = format_status(stats, now=now).splitlines()
    assert lines[0].split()[-4:] == ["CONSEC", "EJECTIONS", "PROBED", "PROBE_MS"]
    assert lines[1].startswith("node-0") and lines[1].split()[-2:] == ["-", "-"]
    assert lines[2].startswith("node-1")
    assert lines[2].split()[-5:] == ["3", "2", "2.1s", "ago", "1.2"]
    assert lines[3].startswith("    reason: health check failed: xxx")
    assert lines[3].endswith("...") and len(lines[3]) < 80
    assert lines[4] == "    ejected for another 4.0s"
    assert lines[5] == "    last error: UNAVAILABLE: connection refused"
    assert lines[6] == ""
    assert lines[7].startswith("0/2 nodes healthy")
    assert "2 retries, 1 resumed" in lines[7]
    assert max(len(line) for line in lines[:3]) < 120


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["generate", "hi"],
        ["nodes"],
        ["drain", "node-0"],
        ["undrain", "node-0"],
    ],
)
def test_unreachable_coordinator_is_one_line_naming_the_address(command: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = omni(*command, "--coordinator", address)
    assert result.returncode == 1
    assert address in result.stderr
    assert "unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_coordinator_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("OMNI_COORDINATOR", address)
    result = omni("status")
    assert result.returncode == 1
    assert address in result.stderr


def test_bad_usage_exits_2() -> None:
    assert omni("up", "--nodes", "0").returncode == 2
    assert omni("status", "--coordinator", "nonsense").returncode == 2
    assert omni().returncode == 2
    assert omni("drain").returncode == 2
    assert omni("drain", "node-0", "--timeout", "0").returncode == 2


def read_lines_until(process: subprocess.Popen[str], last: str, timeout: float) -> list[str]:
    """``process``'s stdout, line by line as it comes, up to the first line containing
    ``last`` (fails if it exits or ``timeout`` passes first)."""
    assert process.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
            if last in line:
                return
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(
                f"no {last!r} within {timeout}s; got:\n" + "\n".join(seen)
            ) from None
        if line is None:
            raise AssertionError(f"omni up exited ({process.wait()}):\n" + "\n".join(seen))
        seen.append(line)
        if last in line:
            return seen


def test_up_says_where_at_once_then_each_node_as_it_loads(tmp_path: Path) -> None:
    """The coordinator's addresses first (before any node is ready), then each node's start,
    loading and readiness; engine options reach every agent's command line."""
    address = f"127.0.0.1:{free_port()}"
    engine_options = ["--dtype", "float32", "--max-model-len", "256"]
    engine_options += ["--engine-arg", "enforce_eager=true", "--engine-arg", 'x={"a": 1}']
    with omni_up_running(
        "--nodes",
        "2",
        "--listen",
        address,
        "--http-listen",
        "127.0.0.1:0",
        "--log-dir",
        str(tmp_path),
        *FAST_SIM_FLAGS,
        *engine_options,
    ) as process:
        lines = read_lines_until(process, "nodes healthy", 60)
        assert lines[0] == f"coordinator  {address} (gRPC)", lines
        http = re.fullmatch(r"http +(http://127\.0\.0\.1:(\d+)/v1) .*", lines[1])
        assert http is not None and int(http.group(2)) > 0, lines
        assert lines[2] == f"logs         {tmp_path}"
        # Then, in this order: each node starting, loading, ready; the table; the ready line.
        starting = [
            i
            for i, line in enumerate(lines)
            if re.fullmatch(r"node-\d: starting \(pid \d+\)", line)
        ]
        loading = [
            i
            for i, line in enumerate(lines)
            if re.match(r"node-\d: loading model sim \(logs: ", line)
        ]
        ready = [
            i
            for i, line in enumerate(lines)
            if re.fullmatch(r"node-\d: ready after [\d.]+ s", line)
        ]
        assert len(starting) == len(loading) == len(ready) == 2, lines
        assert 2 < max(starting) < min(loading) and max(loading) < min(ready), lines
        assert lines[-1] == "2 nodes healthy. Press Ctrl-C to stop."
        assert f"logs: {tmp_path / 'node-0.log'})" in lines[loading[0]]
        # Every agent got the engine options, as given.
        pids = [int(re.findall(r"pid (\d+)", lines[i])[0]) for i in starting]
        for pid in pids:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            joined = " ".join(argv)
            assert " ".join(engine_options) in joined, argv
        assert accepts_connections(f"127.0.0.1:{http.group(2)}")


def test_chat_streams_the_reply_to_a_chat(
    omni_up: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, address, _ = omni_up
    wait_until(lambda: healthy_count(process, address) >= 2, 60, "2 healthy nodes")
    turns = (
        ChatTurn("system", "Be brief."),
        ChatTurn("user", "Hello"),
        ChatTurn("assistant", "Hi: how can I help?"),
        ChatTurn("user", "Name a colour."),
    )
    chat = omni(
        "chat",
        "Name a colour.",
        "--system",
        "Be brief.",
        "--message",
        "user:Hello",
        "--message",
        "assistant:Hi: how can I help?",
        "--max-tokens",
        "6",
        "--seed",
        "2",
        "--model",
        "sim",
        "-v",
        "--coordinator",
        address,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == simulate("", max_tokens=6, seed=2, messages=turns).text + "\n"
    assert chat.stderr.startswith("[node-"), chat.stderr
    # Only --message turns, and the same sampling flags as omni generate.
    only = omni("chat", "--message", "user:Hi", "--max-tokens", "3", "--coordinator", address)
    assert only.returncode == 0, only.stderr
    assert only.stdout == simulate("", max_tokens=3, messages=(ChatTurn("user", "Hi"),)).text + "\n"
    # Nothing to send, a malformed turn, a model nobody serves.
    assert omni("chat", "--coordinator", address).returncode == 2
    bad = omni("chat", "--message", "no colon here", "--coordinator", address)
    assert bad.returncode == 2 and "ROLE:TEXT" in bad.stderr
    missing = omni("chat", "Hi", "--model", "nobody/serves-this", "--coordinator", address)
    assert missing.returncode == 1 and missing.stderr.startswith("error: NOT_FOUND: ")
