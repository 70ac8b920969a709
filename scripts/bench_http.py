"""The HTTP front door against the gRPC path: the same streams, both ways, on one cluster.

Starts a coordinator with ``--http-listen`` and two simulated agents with no simulated
latency (``--sim-ttft-ms 0 --sim-itl-ms 0``: the stack's own cost is what is measured), then
for each path runs ``--streams`` concurrent streams of ``--max-tokens`` tokens, ``--rounds``
requests per stream, after a warm-up round:

* **grpc**: ``Coordinator.Generate`` over one grpc.aio channel;
* **http**: ``POST /v1/completions`` with ``"stream": true`` over aiohttp (one connection per
  concurrent stream), reading the SSE events to ``data: [DONE]``.

It prints requests/s, output tokens/s and the time to first token (p50, p99) per path; the
numbers in docs/http.md come from it. The load generator is this process (one event loop).

    .venv/bin/python scripts/bench_http.py --streams 64 --max-tokens 64 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2


@dataclass
class Phase:
    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    # Messages (gRPC responses, SSE chunks with text) per request: several tokens travel in
    # one when the reader is behind.
    messages: int = 0
    requests: int = 0
    wall_s: float = 0.0
    # CPU time the coordinator process spent during the phase (user + system).
    coordinator_cpu_s: float = 0.0

    def line(self, name: str) -> str:
        ttft = sorted(self.ttft_s)

        def pct(p: float) -> float:
            return ttft[min(len(ttft) - 1, int(p * len(ttft)))] * 1000

        return (
            f"{name:5} {self.requests / self.wall_s:8.1f} req/s {self.tokens / self.wall_s:9.0f} "
            f"tok/s {self.messages / self.requests:5.1f} msg/req  TTFT p50 {pct(0.5):6.1f} ms  "
            f"p99 {pct(0.99):6.1f} ms  coordinator CPU "
            f"{self.coordinator_cpu_s / self.requests * 1e6:5.0f} us/req"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_file(path: Path, process: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{path.name} was not written (see the logs in {path.parent})")
        time.sleep(0.05)
    return int(path.read_text())


def start_cluster(work: Path, agents: int) -> tuple[list[subprocess.Popen[bytes]], str, str]:
    """A coordinator serving gRPC and HTTP, and ``agents`` sim agents; (processes, gRPC
    address, HTTP URL) once every agent is healthy."""
    python = [sys.executable, "-m"]
    with open(work / "coordinator.log", "wb") as log:
        coordinator = subprocess.Popen(
            [
                *python,
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--port-file",
                str(work / "grpc.port"),
                "--http-listen",
                "127.0.0.1:0",
                "--http-port-file",
                str(work / "http.port"),
                "--auth",
                "off",
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    processes = [coordinator]
    address = f"127.0.0.1:{wait_file(work / 'grpc.port', coordinator)}"
    url = f"http://127.0.0.1:{wait_file(work / 'http.port', coordinator)}"
    for index in range(agents):
        with open(work / f"agent-{index}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [
                        *python,
                        "node_agent",
                        "--coordinator",
                        address,
                        "--node-id",
                        f"node-{index}",
                        "--engine",
                        "sim",
                        "--sim-ttft-ms",
                        "0",
                        "--sim-itl-ms",
                        "0",
                        "--auth",
                        "off",
                        "--log-level",
                        "WARNING",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    client = CoordinatorClient(address)
    deadline = time.monotonic() + 60
    while len(client.stats().healthy_nodes) < agents:
        if time.monotonic() > deadline:
            raise SystemExit(f"agents not healthy within 60 s (logs in {work})")
        time.sleep(0.1)
    client.close()
    return processes, address, url


async def grpc_stream(
    stub: coordinator_pb2_grpc.CoordinatorAsyncStub, i: int, tokens: int
) -> tuple[float, int, int]:
    request = generate_pb2.GenerateRequest(prompt=f"bench {i}")
    request.sampling.max_tokens = tokens
    started = time.perf_counter()
    ttft, count, messages = 0.0, 0, 0
    async for response in stub.Generate(request, timeout=60):
        if not count and response.token_ids:
            ttft = time.perf_counter() - started
        count += len(response.token_ids)
        messages += 1
    return ttft, count, messages


async def http_stream(
    session: aiohttp.ClientSession, url: str, i: int, tokens: int
) -> tuple[float, int, int]:
    body = {
        "model": "sim",
        "prompt": f"bench {i}",
        "max_tokens": tokens,
        "stream": True,
        # Tokens counted from the usage chunk (one chunk may carry several tokens).
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, count, messages = 0.0, 0, 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            if not ttft:
                ttft = time.perf_counter() - started
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            else:
                messages += 1
    return ttft, count, messages


async def run_phase(
    one: Callable[[int], Awaitable[tuple[float, int, int]]], streams: int, rounds: int, pid: int
) -> Phase:
    phase = Phase()
    cpu = cpu_seconds(pid)

    async def worker(w: int) -> None:
        for r in range(rounds):
            ttft, count, messages = await one(w * rounds + r)
            phase.ttft_s.append(ttft)
            phase.tokens += count
            phase.messages += messages
            phase.requests += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    phase.wall_s = time.perf_counter() - started
    phase.coordinator_cpu_s = cpu_seconds(pid) - cpu
    return phase


async def measure(
    address: str, url: str, streams: int, tokens: int, rounds: int, pid: int, repeat: int
) -> None:
    async with (
        grpc.aio.insecure_channel(address) as channel,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) as session,
    ):
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)

        async def via_grpc(i: int) -> tuple[float, int, int]:
            return await grpc_stream(stub, i, tokens)

        async def via_http(i: int) -> tuple[float, int, int]:
            return await http_stream(session, url, i, tokens)

        for _, one in (("grpc", via_grpc), ("http", via_http)):
            await run_phase(one, streams, 1, pid)  # warm-up: connections, first-call costs
        # Alternated, so that neither path always runs on a warmer (or busier) machine.
        for _ in range(repeat):
            for name, one in (("grpc", via_grpc), ("http", via_http)):
                phase = await run_phase(one, streams, rounds, pid)
                assert phase.tokens == phase.requests * tokens, (name, phase.tokens)
                print(phase.line(name), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=64, help="concurrent streams")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10, help="requests per stream")
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="measurements of each path, alternated")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omni-bench-http-"))
    processes, address, url = start_cluster(work, args.agents)
    try:
        print(
            f"{args.streams} concurrent streams x {args.rounds} rounds, {args.max_tokens} tokens "
            f"each, {args.agents} sim agents (0 ms TTFT/ITL); logs in {work}",
            flush=True,
        )
        asyncio.run(
            measure(
                address,
                url,
                args.streams,
                args.max_tokens,
                args.rounds,
                processes[0].pid,
                args.repeat,
            )
        )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
