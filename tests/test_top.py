"""``omni top`` as a real process against a live cluster with traffic running."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from typing import IO

import grpc

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk import build_request
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2_grpc
from tests.conftest import read_pty, wait_until

OMNI = [sys.executable, "-m", "omni_rpc"]
TERMINAL = {"COLUMNS": "120", "LINES": "40"}
TOTALS = re.compile(r"(\d+)/(\d+) nodes healthy.*?([\d.]+) tok/s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def top_env() -> dict[str, str]:
    return {**os.environ, **TERMINAL}


def generated_tokens(address: str) -> int:
    client = CoordinatorClient(address)
    try:
        stats = client.stats()
        return sum(node.load.generated_tokens for node in stats.health_stats.values())
    finally:
        client.close()


@contextlib.contextmanager
def traffic(address: str, workers: int = 3) -> Iterator[list[int]]:
    """Generations in background threads until the block ends; yields the finished counts."""
    stop = threading.Event()
    done = [0] * workers
    errors: list[BaseException] = []

    def work(index: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            while not stop.is_set():
                request = build_request(
                    f"top traffic {index} {done[index]}", None, {"max_tokens": 40}
                )
                try:
                    for _ in stub.Generate(request, timeout=30):
                        pass
                except grpc.RpcError as exc:
                    errors.append(exc)
                    return
                done[index] += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        yield done
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, f"traffic failed: {errors}"


def frames(output: str) -> list[str]:
    """Split batch output into its frames (each starts with the ``omni top`` header)."""
    return [f"omni top{part}" for part in output.split("omni top")[1:]]


def node_rows(frame: str, node_ids: list[str]) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in frame.splitlines():
        cells = line.split()
        if cells and cells[0] in node_ids:
            rows[cells[0]] = cells
    return rows


def test_top_shows_every_node_and_tokens_per_second(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    # Health checks (which refresh each node's load report) faster than top's refreshes.
    cluster = make_cluster(3, health_check_interval=0.2)
    address = cluster.coordinator_address
    node_ids = ["node-0", "node-1", "node-2"]
    with traffic(address) as done:
        wait_until(lambda: generated_tokens(address) > 0, 20, "the nodes to report tokens")
        result = subprocess.run(
            [*OMNI, "top", "--coordinator", address, "--iterations", "4", "--interval", "0.3"],
            capture_output=True,
            text=True,
            timeout=60,
            env=top_env(),
            stdin=subprocess.DEVNULL,
        )
        assert sum(done) > 0, "no generation finished while top ran"
    assert result.returncode == 0, result.stderr
    shown = frames(result.stdout)
    assert len(shown) == 4, result.stdout
    rates: list[float] = []
    for frame in shown:
        assert address in frame.splitlines()[0]
        assert all(len(line) <= 120 for line in frame.splitlines()), frame
        rows = node_rows(frame, node_ids)
        assert sorted(rows) == node_ids, frame
        assert all(cells[1] == "healthy" for cells in rows.values()), frame
        totals = TOTALS.search(frame)
        assert totals is not None, frame
        assert (totals[1], totals[2]) == ("3", "3"), frame
        rates.append(float(totals[3]))
    # A rate needs two load reports: the first frame cannot have one, a later one must.
    assert rates[0] == 0.0
    assert max(rates) > 0, result.stdout
    # The per-node column agrees with the total: some node shows a positive TOK/S.
    best = shown[rates.index(max(rates))]
    per_node = [cells[11] for cells in node_rows(best, node_ids).values()]
    assert any(value != "-" and float(value) > 0 for value in per_node), best


def test_top_unreachable_coordinator_exits_non_zero_naming_it() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [*OMNI, "top", "--coordinator", address, "--iterations", "2", "--interval", "0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=top_env(),
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert address in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


def read_into(stream: IO[str], sink: list[str]) -> None:
    for line in stream:
        sink.append(line)


def test_top_ctrl_c_exits_zero(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(2)
    process = subprocess.Popen(
        [*OMNI, "top", "--coordinator", cluster.coordinator_address, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=top_env(),
    )
    assert process.stdout is not None
    out: list[str] = []
    reader = threading.Thread(target=read_into, args=(process.stdout, out), daemon=True)
    reader.start()
    try:
        wait_until(lambda: sum("nodes healthy" in line for line in out) >= 2, 20, "two frames")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_top_on_a_terminal_redraws_in_place(make_cluster: Callable[..., LocalCluster]) -> None:
    """Given a real terminal (a pty, 120x40) top uses rich's live display, and Ctrl-C is 0."""
    cluster = make_cluster(2)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in top_env().items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [*OMNI, "top", "--coordinator", cluster.coordinator_address, "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks, reader = read_pty(master)
    try:
        wait_until(
            lambda: b"".join(chunks).count(b"nodes healthy") >= 2, 20, "two frames on the pty"
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(5)
        os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "node-0" in screen and "node-1" in screen
    assert "2/2 nodes healthy" in screen
    # Redrawn in place: cursor movement/erase sequences, not a scrolling log of frames.
    assert "\x1b[" in screen and ("\x1b[2K" in screen or "\x1b[1A" in screen), repr(screen[:400])
