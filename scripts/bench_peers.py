"""Side by side with vllm-router: the same simulated engines behind each router, one run.

``make bench-peers`` (``.venv/bin/python scripts/bench_peers.py``) measures two systems on this
machine, each with two backends:

* **vllm-router** (the Rust router from PyPI, installed once into its own cached virtual
  environment, ``round_robin`` policy) in front of two OpenAI-compatible mock workers
  (``scripts/mock_openai_worker.py``), which run the very ``sim`` engine of a node agent and so
  produce the same output at the same pace;
* **omni-rpc**: a coordinator (``round_robin``) in front of two ``sim`` node agents.

Each workload is sent five ways: vllm-router routed (HTTP), the mock workers direct (HTTP),
omni routed over HTTP (the coordinator's OpenAI-compatible ``POST /v1/completions``, started
with ``--http-listen``; skipped with a note when the coordinator has no such flag), omni routed
over gRPC (``omni.v1.Coordinator/Generate``) and the agents direct (``omni.v1.NodeAgent/Generate``,
first message ``AgentRequest(generate=..., attempt=1)``). Load generators are separate
processes (``bench_peers.py loadgen``): one HTTP SSE client (aiohttp) for every HTTP path, ours
and vllm-router's alike, and grpc.aio clients for the gRPC paths. Every process's CPU is read
from /proc around the measured window.

Tokens are counted the same way on every HTTP path, from the plain OpenAI request (no
extensions: the coordinator refuses parameters it does not know): each SSE chunk with text
counts one token as it arrives (``len(token_ids)`` instead, should a server send ids), and the
request's count is then set to the final usage chunk's ``completion_tokens``
(``stream_options.include_usage``), the difference credited when the stream ends; gRPC
responses count ``len(token_ids)``. The mock workers send one SSE chunk per engine step, one
token, so their chunks are exact; the coordinator may put several tokens in one message or
chunk (the *msgs/request* column), and its HTTP tokens are then credited partly at the end of
each request, which over a steady window adds up the same.

Workloads (``--only`` takes these names, comma separated):

* ``latency``: concurrency 1, 16 tokens, zero engine time: TTFT p50, routed minus direct;
* ``throughput``: concurrency 64 x 100 tokens, zero engine time: tokens/s;
* ``streams``: concurrency 64, 1-token requests, zero engine time: new streams/s;
* ``paced``: concurrency 256 x 100 tokens at 20 ms per token (TTFT 20 ms): tokens/s, TTFT;
* ``workers``: omni routed with coordinator ``--workers 1`` and ``--workers 2`` on
  ``throughput`` and ``paced`` (skipped with a note when the coordinator has no such flag);
* ``idle``: 128 simulated agents joined and idle; CPU of the coordinator's processes.

``--systems omni`` leaves vllm-router and the mock workers out (no install; the smoke test of
``tests/test_bench_peers.py`` runs ``--quick --only latency --systems omni``).

The report goes into docs/benchmarks.md, section "Side by side with vllm-router" (between
``<!-- bench:peers:start -->`` and ``<!-- bench:peers:end -->``; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc

from omni_rpc import config
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    node_agent_pb2,
    node_agent_pb2_grpc,
)

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "benchmarks.md"
MOCK_WORKER = ROOT / "scripts" / "mock_openai_worker.py"
VLLM_ROUTER_VERSION = "0.1.17"
CACHE_DIR = Path(
    os.environ.get("OMNI_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni-rpc"
)
SECTION_START = "<!-- bench:peers:start -->"
SECTION_END = "<!-- bench:peers:end -->"
DATA_PREFIX = "<!-- bench:peers:data "
SECTION_TITLE = "## Side by side with vllm-router"

REQUEST_TIMEOUT_S = 60.0
STARTUP_TIMEOUT_S = 60.0
NUM_PROMPTS = 32
IDLE_AGENTS = 128
IDLE_AGENTS_PER_PROCESS = 32

PATHS = ("vllm-router", "mock-direct", "omni-http", "omni-routed", "omni-direct")
# The order paths are measured in: the routed ones next to each other, then the direct ones.
INTERLEAVED = ("vllm-router", "omni-http", "omni-routed", "mock-direct", "omni-direct")
PATH_LABELS = {
    "vllm-router": "vllm-router routed (HTTP)",
    "mock-direct": "mock workers direct (HTTP)",
    "omni-http": "omni routed (HTTP /v1/completions)",
    "omni-routed": "omni routed (gRPC coordinator)",
    "omni-direct": "omni direct (gRPC agents)",
}
# How each path is called: the one HTTP load generator, or gRPC to a coordinator or an agent.
PATH_KIND = {
    "vllm-router": "http",
    "mock-direct": "http",
    "omni-http": "http",
    "omni-routed": "coordinator",
    "omni-direct": "agent",
}
SYSTEM_PATHS = {"vllm": ("vllm-router", "mock-direct"), "omni": PATHS[2:]}
SYSTEMS = tuple(SYSTEM_PATHS)
SYSTEM_TITLES = {"vllm": "vllm-router + 2 mock workers", "omni": "omni + 2 agents"}
HTTP_FLAG = "--http-listen"


# --- what is measured --------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineTiming:
    """The simulated engine's settings, the same for the agents and the mock workers."""

    ttft_ms: float
    itl_ms: float
    # No slow-down with load and no queueing: the engine's time is the same on every path.
    itl_growth: float = 0.0
    max_concurrency: int = 256

    def args(self) -> list[str]:
        return [
            "--sim-ttft-ms", str(self.ttft_ms),
            "--sim-itl-ms", str(self.itl_ms),
            "--sim-itl-growth", str(self.itl_growth),
            "--sim-max-concurrency", str(self.max_concurrency),
        ]  # fmt: skip

    def describe(self) -> str:
        if self.ttft_ms == 0 and self.itl_ms == 0:
            return "zero engine time"
        return f"TTFT {self.ttft_ms:g} ms, {self.itl_ms:g} ms per token"


ZERO = EngineTiming(0.0, 0.0)
PACED = EngineTiming(20.0, 20.0)


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    concurrency: int
    max_tokens: int
    timing: EngineTiming
    warmup_s: float
    duration_s: float


WORKLOADS = (
    Workload("latency", "concurrency 1, 16 tokens", 1, 16, ZERO, 2.0, 10.0),
    Workload("throughput", "concurrency 64 x 100 tokens", 64, 100, ZERO, 2.0, 10.0),
    Workload("streams", "concurrency 64, 1-token requests", 64, 1, ZERO, 2.0, 10.0),
    Workload("paced", "concurrency 256 x 100 tokens", 256, 100, PACED, 3.0, 15.0),
)
WORKERS_ON = ("throughput", "paced")
CHOICES = (*(w.name for w in WORKLOADS), "workers", "idle")
IDLE_SECONDS = 60.0
QUICK_SCALE = 0.25
QUICK_IDLE_SECONDS = 10.0


# --- CPU accounting from /proc -----------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # After "pid (comm)": state is field 3, ppid 4, utime 14, stime 15 (1-based).
    return stat.rsplit(")", 1)[1].split()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0.0 once it is gone)."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children, grandchildren...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [pid], [pid]
    while frontier:
        below = [p for p, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def tree_cpu(roots: Sequence[int]) -> dict[int, float]:
    """CPU seconds so far of each process in the trees under ``roots``."""
    return {p: process_cpu_s(p) for root in roots for p in descendants(root)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two ``tree_cpu`` snapshots (processes born between count from 0;
    ones that ended in between are lost)."""
    return sum(after[p] - before.get(p, 0.0) for p in after if after[p] >= before.get(p, 0.0))


def machine_busy_cpu_s() -> float:
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


# --- the load generator (a separate process) ---------------------------------------------------

PROMPTS = [
    f"benchmark prompt {k}: explain distributed inference over gRPC" for k in range(NUM_PROMPTS)
]


@dataclass
class Recorder:
    max_tokens: int
    measuring: bool = False
    stopping: bool = False
    tokens: int = 0
    completed: int = 0
    errors: int = 0
    ttfts: list[float] = field(default_factory=list)
    # Messages (SSE chunks or gRPC responses) that carried tokens, per request in ``ttfts``.
    messages: list[int] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        if self.measuring:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append(message[:300])

    def received(self, tokens: int) -> None:
        """``tokens`` arrived (negative: a correction of what was counted)."""
        if self.measuring:
            self.tokens += tokens

    def check(self, finish_reason: str, tokens: int) -> None:
        if finish_reason != "length" or tokens != self.max_tokens:
            raise RuntimeError(f"unexpected end: finish_reason={finish_reason!r} tokens={tokens}")


@dataclass(frozen=True)
class Done:
    """One request that ended well: its time to first token and its messages with tokens."""

    ttft_s: float
    messages: int


Caller = Callable[[int, Recorder], Awaitable[Done]]


def completion_bodies(max_tokens: int) -> list[bytes]:
    """The OpenAI completions bodies every HTTP path gets (streamed, with a usage chunk)."""
    return [
        json.dumps(
            {
                "model": "sim",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "seed": k,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        for k, prompt in enumerate(PROMPTS)
    ]


def chunk_tokens(choice: dict[str, Any]) -> tuple[int, bool]:
    """Tokens in one streamed choice, and whether the server said so (``token_ids``, which
    vLLM sends when asked) or the count is one for a chunk with text (corrected from the usage
    at the end)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids), True
    return (1 if choice.get("text") else 0), False


def http_caller(
    urls: Sequence[str], max_tokens: int
) -> tuple[Caller, Callable[[], Awaitable[None]]]:
    """The one HTTP load generator: OpenAI ``/v1/completions`` streamed as SSE, for
    vllm-router, the mock workers and the coordinator's front door alike."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )
    bodies = completion_bodies(max_tokens)
    headers = {"Content-Type": "application/json"}

    async def call(index: int, rec: Recorder) -> Done:
        start = time.perf_counter()
        first = 0.0
        tokens = 0
        messages = 0
        guessed = False  # some chunk had text but no token ids
        usage: int | None = None
        finish = ""
        url = urls[index % len(urls)]
        async with session.post(url, data=bodies[index % NUM_PROMPTS], headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                for choice in event.get("choices") or ():
                    n, said = chunk_tokens(choice)
                    if n:
                        if not first:
                            first = time.perf_counter()
                        tokens += n
                        messages += 1
                        guessed = guessed or not said
                        rec.received(n)
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    usage = int(event["usage"]["completion_tokens"])
            else:
                raise RuntimeError(f"stream ended without [DONE] after {tokens} tokens")
        if usage is not None and usage != tokens:
            if not guessed:
                raise RuntimeError(f"usage says {usage} tokens, the chunks' token_ids {tokens}")
            rec.received(usage - tokens)
            tokens = usage
        rec.check(finish, tokens)
        return Done(first - start, messages)

    return call, session.close


def grpc_caller(
    kind: str, targets: Sequence[str], max_tokens: int, tag: str
) -> tuple[Caller, Callable[[], Awaitable[None]]]:
    channels = [grpc.aio.insecure_channel(t, options=config.GRPC_MESSAGE_OPTIONS) for t in targets]
    samplings = [
        generate_pb2.SamplingParams(max_tokens=max_tokens, seed=k) for k in range(NUM_PROMPTS)
    ]

    def request(index: int) -> generate_pb2.GenerateRequest:
        k = index % NUM_PROMPTS
        return generate_pb2.GenerateRequest(
            request_id=f"{tag}-{index}", prompt=PROMPTS[k], sampling=samplings[k]
        )

    async def consume(stream: Any, rec: Recorder, start: float) -> Done:
        first = 0.0
        tokens = 0
        messages = 0
        finish = ""
        async for response in stream:
            n = len(response.token_ids)
            if n:
                if not first:
                    first = time.perf_counter()
                tokens += n
                messages += 1
                rec.received(n)
            if response.finish_reason:
                finish = response.finish_reason
        rec.check(finish, tokens)
        return Done(first - start, messages)

    if kind == "coordinator":
        coordinators = [coordinator_pb2_grpc.CoordinatorStub(c) for c in channels]

        async def call(index: int, rec: Recorder) -> Done:
            start = time.perf_counter()
            stream = coordinators[index % len(coordinators)].Generate(
                request(index), timeout=REQUEST_TIMEOUT_S
            )
            try:
                return await consume(stream, rec, start)
            finally:
                stream.cancel()  # a no-op once the call has ended

    else:
        agents = [node_agent_pb2_grpc.NodeAgentStub(c) for c in channels]

        async def call(index: int, rec: Recorder) -> Done:
            start = time.perf_counter()
            stream = agents[index % len(agents)].Generate(timeout=REQUEST_TIMEOUT_S)  # type: ignore[call-arg]
            try:
                await stream.write(node_agent_pb2.AgentRequest(generate=request(index), attempt=1))
                return await consume(stream, rec, start)
            finally:
                stream.cancel()

    async def close() -> None:
        for channel in channels:
            await channel.close(None)

    return call, close


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Drive one workload at ``spec`` and return what was measured in the window."""
    rec = Recorder(max_tokens=spec["max_tokens"])
    if spec["kind"] == "http":
        call, close = http_caller(spec["targets"], spec["max_tokens"])
    else:
        call, close = grpc_caller(spec["kind"], spec["targets"], spec["max_tokens"], spec["tag"])
    concurrency = spec["concurrency"]
    offset = spec.get("offset", 0)
    emit("READY")
    # The parent says GO once every load generator of the workload is ready.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    async def worker(w: int) -> None:
        index = offset + w
        while not rec.stopping:
            in_window = rec.measuring
            try:
                done = await call(index, rec)
            except (TimeoutError, grpc.aio.AioRpcError, RuntimeError, OSError) as exc:
                detail = (
                    f"{exc.code().name}: {exc.details()}"
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else f"{type(exc).__name__}: {exc}"
                )
                rec.error(detail)
                await asyncio.sleep(0.05)
            except Exception as exc:  # aiohttp's errors, without importing it here
                rec.error(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)
            else:
                if rec.measuring:
                    rec.completed += 1
                if in_window:  # also when it ends after the window (long requests)
                    rec.ttfts.append(done.ttft_s)
                    rec.messages.append(done.messages)
            index += concurrency * spec.get("clients", 1)

    tasks = [asyncio.create_task(worker(w)) for w in range(concurrency)]
    await asyncio.sleep(spec["warmup_s"])
    own_before = os.times()
    start = time.perf_counter()
    rec.measuring = True
    emit("MEASURE_START")
    await asyncio.sleep(spec["duration_s"])
    rec.measuring = False
    window = time.perf_counter() - start
    own_after = os.times()
    emit("MEASURE_END")
    rec.stopping = True
    _, pending = await asyncio.wait(tasks, timeout=10.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await close()
    return {
        "window_s": window,
        "tokens": rec.tokens,
        "completed": rec.completed,
        "errors": rec.errors,
        "error_samples": rec.error_samples,
        "ttfts": [round(t, 7) for t in rec.ttfts],
        "messages": rec.messages,
        "cpu_s": (own_after.user + own_after.system) - (own_before.user + own_before.system),
    }


def loadgen_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result = asyncio.run(run_load(spec))
    emit("RESULT " + json.dumps(result))
    return 0


# --- 128 idle agents (a separate process hosts many) -------------------------------------------


async def host_agents(coordinator: str, count: int, prefix: str) -> None:
    """Run ``count`` real node agents (``node_agent.main.serve``, embedded) in this process."""
    from node_agent import main as agent_main
    from omni_rpc import settings
    from omni_rpc.logging import configure_logging

    configure_logging("json", "WARNING")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agents = []
    for i in range(count):
        argv = [
            "--coordinator", coordinator, "--listen", "127.0.0.1:0",
            "--node-id", f"{prefix}{i:03d}", "--engine", "sim", "--launcher", "local",
            "--auth", "off",
        ]  # fmt: skip
        args, _ = settings.parse(agent_main.build_parser(), "agent", argv, env={})
        agents.append(asyncio.create_task(agent_main.serve(args, stop=stop)))
    await asyncio.gather(*agents)


# --- processes of the systems under test -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """Child processes started here; all stopped on exit, whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(
        self, name: str, argv: Sequence[str], stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        process = subprocess.Popen(
            list(argv),
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        log.close()
        self.children.append((name, process))
        return process

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check(self, name: str, process: subprocess.Popen[bytes]) -> None:
        """Raise, with the end of its log, if ``process`` (started as ``name``) has exited."""
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def stop(self, process: subprocess.Popen[bytes] | None = None) -> None:
        targets = [c for c in self.children if process is None or c[1] is process]
        for _, child in targets:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for _, child in targets:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = [c for c in self.children if c not in targets]


def wait_for_file(path: Path, check: Callable[[], None], what: str) -> str:
    """The content of ``path`` once it exists (a port file); ``check`` raises if the process
    that writes it has died."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists() and (text := path.read_text().strip()):
            return text
        check()
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {STARTUP_TIMEOUT_S:.0f}s")


def http_ok(url: str, body: bytes | None = None) -> bool:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"} if body else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


PROBE = json.dumps({"model": "sim", "prompt": "ready?", "max_tokens": 1}).encode()


def wait_http_route(url: str, check: Callable[[], None], what: str) -> None:
    """Until a completion posted to ``url`` succeeds (the router has a backend to send it to);
    ``check`` raises if the router has died."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not http_ok(url, PROBE):
        check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not route a request within the startup timeout")
        time.sleep(0.1)


@dataclass
class Stack:
    """One system under test: how to reach it and which processes are whose."""

    system: str  # "vllm" or "omni"
    routed: list[str]
    direct: list[str]
    router_pids: list[int]
    backend_pids: list[int]
    stop: Callable[[], None]
    # The coordinator's OpenAI-compatible front door (omni, when started with it).
    http: list[str] = field(default_factory=list)

    def targets(self, path: str) -> list[str]:
        """Where the load generators of ``path`` send their requests."""
        if path == "omni-http":
            return self.http
        return self.routed if path in ("vllm-router", "omni-routed") else self.direct


def ensure_vllm_router(version: str) -> Path:
    """vllm-router ``version`` from PyPI in its own virtual environment, cached and reused."""
    venv = CACHE_DIR / f"vllm-router-{version}"
    exe = venv / "bin" / "vllm-router"
    if (venv / ".complete").exists() and exe.exists():
        return exe
    print(f"installing vllm-router {version} into {venv} (once)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [
            str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check", f"vllm-router=={version}",
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if pip.returncode != 0:
        raise RuntimeError(f"pip install vllm-router=={version} failed:\n{pip.stderr[-2000:]}")
    subprocess.run([str(exe), "--help"], check=True, capture_output=True, timeout=60)
    (venv / ".complete").touch()
    return exe


def start_vllm_stack(router: Path, timing: EngineTiming, procs: Processes) -> Stack:
    workers: list[subprocess.Popen[bytes]] = []
    urls = []
    for i in range(2):
        port_file = procs.log_dir / f"mock-{i}.port"
        port_file.unlink(missing_ok=True)
        name = f"mock-worker-{i}"
        process = procs.spawn(
            name,
            [sys.executable, str(MOCK_WORKER), "--port", "0", "--port-file", str(port_file),
             *timing.args()],
        )  # fmt: skip
        workers.append(process)
        check = functools.partial(procs.check, name, process)
        urls.append(f"http://127.0.0.1:{wait_for_file(port_file, check, name)}")
    port = free_port()
    router_process = procs.spawn(
        "vllm-router",
        [
            str(router), "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *urls, "--policy", "round_robin",
            "--prometheus-port", str(free_port()),
            "--worker-startup-check-interval", "1",
        ],
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    check = functools.partial(procs.check, "vllm-router", router_process)
    wait_http_route(base + "/v1/completions", check, "vllm-router")

    def stop() -> None:
        procs.stop(router_process)
        for w in workers:
            procs.stop(w)

    return Stack(
        "vllm",
        [base + "/v1/completions"],
        [u + "/v1/completions" for u in urls],
        [router_process.pid],
        [w.pid for w in workers],
        stop,
    )


def wait_nodes(address: str, count: int, check: Callable[[], None]) -> list[str]:
    """Addresses of ``count`` healthy nodes, once the coordinator lists them."""
    from omni_rpc.sdk.client import CoordinatorClient

    client = CoordinatorClient(address, timeout_s=5.0)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S + count * 0.5
    try:
        while True:
            check()
            try:
                nodes = client.nodes()
            except ConnectionError:
                nodes = []
            healthy = [n for n in nodes if n.state == coordinator_pb2.NODE_STATE_HEALTHY]
            if len(healthy) >= count:
                return [n.address for n in sorted(healthy, key=lambda n: n.node_id)]
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(healthy)} of {count} nodes healthy in time")
            time.sleep(0.2)
    finally:
        client.close()


def start_omni_stack(
    timing: EngineTiming | None,
    coordinator_args: Sequence[str],
    log_dir: Path,
    num_nodes: int = 2,
    http: bool = False,
) -> tuple[Stack, Any]:
    """A coordinator and ``num_nodes`` agents; with ``http``, also the coordinator's
    OpenAI-compatible front door (``--http-listen``), ready once it routes a completion."""
    from omni_rpc.launchers.local import LocalCluster

    cluster = LocalCluster(
        num_nodes=num_nodes,
        strategy="round_robin",
        http_listen="127.0.0.1:0" if http else None,
        coordinator_args=list(coordinator_args),
        agent_args=timing.args() if timing is not None else [],
        log_dir=Path(tempfile.mkdtemp(prefix="omni-", dir=log_dir)),
    )
    urls = []
    try:
        address = cluster.start()
        agents = wait_nodes(address, num_nodes, cluster.check_alive) if num_nodes else []
        if http:
            urls.append(cluster.http_url + "/completions")  # http_url: http://HOST:PORT/v1
            wait_http_route(urls[0], cluster.check_alive, "the coordinator's HTTP front door")
    except BaseException:
        cluster.stop()
        raise
    assert cluster.coordinator is not None
    stack = Stack(
        "omni",
        [address],
        agents,
        [cluster.coordinator.process.pid],
        [a.process.pid for a in cluster.agents],
        cluster.stop,
        http=urls,
    )
    return stack, cluster


@functools.cache
def coordinator_help() -> str:
    try:
        return subprocess.run(
            [sys.executable, "-m", "coordinator", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def coordinator_supports(flag: str) -> bool:
    """Whether ``omni-coordinator --help`` lists ``flag``."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", coordinator_help()) is not None


# --- one measurement ---------------------------------------------------------------------------


@dataclass
class Row:
    """One workload on one path."""

    path: str
    label: str
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    ttft_mean_ms: float = float("nan")
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    # Messages carrying tokens (SSE chunks, gRPC responses) per request.
    msgs_per_request: float = float("nan")
    tokens_per_s: float = 0.0
    streams_per_s: float = 0.0
    window_s: float = 0.0
    clients: int = 1
    repeats: int = 1
    # CPU over the window, % of one core.
    loadgen_cpu: float = 0.0
    router_cpu: float = 0.0
    backends_cpu: float = 0.0
    other_cpu: float = 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _read_until(stream: IO[bytes], marker: str, name: str) -> str:
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"load generator {name} ended before {marker}")
        text = line.decode().rstrip("\n")
        if text.startswith(marker):
            return text


def run_loadgens(
    workload: Workload,
    path: str,
    stack: Stack,
    procs: Processes,
    scale: float,
    clients: int,
    label: str | None = None,
) -> Row:
    """Start the load generators of one measurement, read CPU around their window, merge."""
    kind = PATH_KIND[path]
    targets = stack.targets(path)
    clients = max(1, min(clients, workload.concurrency))
    per_client = workload.concurrency // clients
    loadgens: list[subprocess.Popen[bytes]] = []
    for c in range(clients):
        spec = {
            "kind": kind,
            "targets": targets,
            "concurrency": per_client + (1 if c < workload.concurrency % clients else 0),
            "offset": c * per_client,
            "clients": clients,
            "max_tokens": workload.max_tokens,
            "warmup_s": max(0.5, workload.warmup_s * scale),
            "duration_s": max(1.5, workload.duration_s * scale),
            "tag": f"{workload.name}-{path}-{c}-{time.monotonic_ns()}",
        }
        stderr = open(procs.log_dir / f"loadgen-{workload.name}-{path}-{c}.log", "ab")
        loadgens.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "loadgen", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
        )
        stderr.close()
    try:
        for i, p in enumerate(loadgens):
            assert p.stdout is not None
            _read_until(p.stdout, "READY", str(i))
        for p in loadgens:
            assert p.stdin is not None
            p.stdin.write(b"GO\n")
            p.stdin.flush()
        groups = {"router": stack.router_pids, "backends": stack.backend_pids}
        before: dict[str, dict[int, float]] = {}
        for i, p in enumerate(loadgens):
            assert p.stdout is not None
            _read_until(p.stdout, "MEASURE_START", str(i))
            if i == 0:
                before = {g: tree_cpu(pids) for g, pids in groups.items()}
                machine_before = machine_busy_cpu_s()
                loadgens_before = tree_cpu([q.pid for q in loadgens])
        for i, p in enumerate(loadgens):
            assert p.stdout is not None
            _read_until(p.stdout, "MEASURE_END", str(i))
        after = {g: tree_cpu(pids) for g, pids in groups.items()}
        machine_after = machine_busy_cpu_s()
        loadgens_after = tree_cpu([q.pid for q in loadgens])
        results = []
        for i, p in enumerate(loadgens):
            assert p.stdout is not None
            results.append(json.loads(_read_until(p.stdout, "RESULT ", str(i))[len("RESULT ") :]))
            p.wait(30)
    finally:
        for p in loadgens:
            if p.poll() is None:
                p.kill()
                p.wait()
    window = max(r["window_s"] for r in results)
    ttfts = [t for r in results for t in r["ttfts"]]
    messages = [m for r in results for m in r["messages"]]
    used = {g: cpu_delta(before[g], after[g]) for g in groups}
    loadgen_cpu = sum(r["cpu_s"] for r in results)
    ours = sum(used.values()) + cpu_delta(loadgens_before, loadgens_after)
    row = Row(
        path=path,
        label=label or PATH_LABELS[path],
        requests=sum(r["completed"] for r in results),
        errors=sum(r["errors"] for r in results),
        error_samples=[e for r in results for e in r["error_samples"]][:5],
        ttft_mean_ms=mean(ttfts) * 1000.0,
        ttft_p50_ms=percentile(ttfts, 50) * 1000.0,
        ttft_p99_ms=percentile(ttfts, 99) * 1000.0,
        msgs_per_request=mean(messages),
        tokens_per_s=sum(r["tokens"] for r in results) / window,
        streams_per_s=sum(r["completed"] for r in results) / window,
        window_s=window,
        clients=clients,
        loadgen_cpu=100.0 * loadgen_cpu / window,
        router_cpu=100.0 * used["router"] / window,
        backends_cpu=100.0 * used["backends"] / window,
        other_cpu=100.0 * max(0.0, machine_after - machine_before - ours) / window,
    )
    print("  " + describe(workload, row), flush=True)
    return row


def median_row(rows: Sequence[Row]) -> Row:
    """Each number the median over repetitions of the same path (one row: itself)."""
    if len(rows) == 1:
        return rows[0]
    merged = Row(path=rows[0].path, label=rows[0].label, clients=rows[0].clients)
    for name in (
        "requests", "errors", "ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "msgs_per_request",
        "tokens_per_s", "streams_per_s", "window_s", "loadgen_cpu", "router_cpu",
        "backends_cpu", "other_cpu",
    ):  # fmt: skip
        values = sorted(getattr(r, name) for r in rows)
        value = percentile(values, 50)
        setattr(merged, name, round(value) if name in ("requests", "errors") else value)
    merged.errors = sum(r.errors for r in rows)
    merged.error_samples = [e for r in rows for e in r.error_samples][:5]
    merged.repeats = len(rows)
    return merged


def describe(workload: Workload, row: Row) -> str:
    return (
        f"{workload.name:<10} {row.label:<34} n={row.requests:<6} err={row.errors:<3} "
        f"ttft mean={row.ttft_mean_ms:.2f} p50={row.ttft_p50_ms:.2f} p99={row.ttft_p99_ms:.2f} ms "
        f"{row.tokens_per_s:.0f} tok/s {row.streams_per_s:.0f} streams/s "
        f"{row.msgs_per_request:.1f} msgs/req | cpu% "
        f"loadgen {row.loadgen_cpu:.0f} router {row.router_cpu:.0f} "
        f"backends {row.backends_cpu:.0f} other {row.other_cpu:.0f}"
    )


# --- the idle cluster --------------------------------------------------------------------------


@dataclass
class IdleResult:
    agents: int
    agent_processes: int
    seconds: float
    coordinator_processes: int
    coordinator_cpu: float  # % of one core
    agents_cpu: float  # % of one core, all agent host processes
    health_check_interval_s: float
    coordinator_args: list[str]


def run_idle(
    log_dir: Path, procs: Processes, seconds: float, coordinator_args: Sequence[str]
) -> IdleResult:
    stack, cluster = start_omni_stack(None, coordinator_args, log_dir, num_nodes=0)
    hosts = []
    try:
        per = IDLE_AGENTS_PER_PROCESS
        for h in range(IDLE_AGENTS // per):
            hosts.append(
                procs.spawn(
                    f"idle-agents-{h}",
                    [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "idle-agents",
                        "--coordinator",
                        stack.routed[0],
                        "--count",
                        str(per),
                        "--prefix",
                        f"idle-{h}-",
                    ],
                )
            )

        def check() -> None:
            cluster.check_alive()
            for h, host in enumerate(hosts):
                if host.poll() is not None:
                    raise RuntimeError(
                        f"idle agent host {h} exited:\n{procs.log_tail(f'idle-agents-{h}')}"
                    )

        wait_nodes(stack.routed[0], IDLE_AGENTS, check)
        time.sleep(5.0)  # joins and first probes settle
        roots = stack.router_pids
        before = tree_cpu(roots)
        hosts_before = tree_cpu([h.pid for h in hosts])
        start = time.perf_counter()
        time.sleep(seconds)
        window = time.perf_counter() - start
        after = tree_cpu(roots)
        hosts_after = tree_cpu([h.pid for h in hosts])
        check()
        result = IdleResult(
            agents=IDLE_AGENTS,
            agent_processes=len(hosts),
            seconds=window,
            coordinator_processes=len(after),
            coordinator_cpu=100.0 * cpu_delta(before, after) / window,
            agents_cpu=100.0 * cpu_delta(hosts_before, hosts_after) / window,
            health_check_interval_s=cluster.health_check_interval,
            coordinator_args=list(coordinator_args),
        )
    finally:
        for host in hosts:
            procs.stop(host)
        stack.stop()
    print(
        f"  idle       {IDLE_AGENTS} agents in {len(hosts)} processes, {window:.0f} s: "
        f"coordinator ({result.coordinator_processes} process(es)) {result.coordinator_cpu:.2f}% "
        f"of one core; agent hosts {result.agents_cpu:.1f}%",
        flush=True,
    )
    return result


# --- the run -----------------------------------------------------------------------------------


@dataclass
class Results:
    when: str = ""
    command: str = ""
    duration_s: float = 0.0
    quick: bool = False
    clients: int = 1
    repeat: int = 1
    vllm_router_version: str = VLLM_ROUTER_VERSION
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    workers_flag: bool | None = None
    # Whether the coordinator has its HTTP front door (--http-listen).
    http_flag: bool | None = None
    rows: dict[str, list[Row]] = field(default_factory=dict)
    # "workers" rows: workload name -> rows ("--workers 1", "--workers 2").
    workers: dict[str, list[Row]] = field(default_factory=dict)
    idle: IdleResult | None = None
    # The same with the coordinator's --workers 2 (when it has the flag).
    idle_workers: IdleResult | None = None
    notes: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Results:
        data = json.loads(text)
        res = cls(
            **{
                k: v
                for k, v in data.items()
                if k not in ("rows", "workers", "idle", "idle_workers")
            }
        )
        res.rows = {k: [Row(**r) for r in v] for k, v in data.get("rows", {}).items()}
        res.workers = {k: [Row(**r) for r in v] for k, v in data.get("workers", {}).items()}
        res.idle = IdleResult(**data["idle"]) if data.get("idle") else None
        if data.get("idle_workers"):
            res.idle_workers = IdleResult(**data["idle_workers"])
        return res


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import aiohttp

        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = "missing"
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "grpcio": grpc.__version__,
        "aiohttp": aiohttp_version,
        "platform": platform.platform(),
        "load_before": load,
    }


def run(args: argparse.Namespace) -> Results:
    selected = set(args.only or CHOICES)
    scale = QUICK_SCALE if args.quick else 1.0
    res = Results(
        when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(shlex.quote(a) for a in ["scripts/bench_peers.py", *sys.argv[1:]]),
        quick=args.quick,
        clients=args.clients,
        repeat=args.repeat,
        systems=list(args.systems),
        machine=machine_info(),
    )
    log_dir = Path(tempfile.mkdtemp(prefix="omni-bench-peers-"))
    procs = Processes(log_dir)
    print(f"bench-peers: logs in {log_dir}", flush=True)
    started = time.perf_counter()
    try:
        workloads = [w for w in WORKLOADS if w.name in selected]
        with_vllm = "vllm" in args.systems and bool(workloads)
        with_omni = "omni" in args.systems and bool(workloads)
        router = ensure_vllm_router(args.vllm_router_version) if with_vllm else None
        res.vllm_router_version = args.vllm_router_version
        paths = [p for s in args.systems for p in SYSTEM_PATHS[s]]
        if with_omni:
            res.http_flag = coordinator_supports(HTTP_FLAG)
            if not res.http_flag:
                note = (
                    f"`{HTTP_FLAG}`: the coordinator has no HTTP front door yet "
                    "(`omni-coordinator --help`), so omni was measured over gRPC only."
                )
                res.notes.append(note)
                print("  " + note, flush=True)
                paths.remove("omni-http")
        for timing in (ZERO, PACED):
            group = [w for w in workloads if w.timing == timing]
            if not group:
                continue
            # Both systems stay up and the paths alternate, so that whatever else the machine
            # does at the time weighs on them alike.
            title = " and ".join(SYSTEM_TITLES[s] for s in args.systems)
            print(f"{title}: {timing.describe()}", flush=True)
            with contextlib.ExitStack() as stacks:
                systems: dict[str, Stack] = {}
                if with_vllm:
                    assert router is not None
                    vllm = start_vllm_stack(router, timing, procs)
                    stacks.callback(vllm.stop)
                    systems.update(dict.fromkeys(SYSTEM_PATHS["vllm"], vllm))
                if with_omni:
                    omni, _ = start_omni_stack(timing, [], log_dir, http=bool(res.http_flag))
                    stacks.callback(omni.stop)
                    systems.update(dict.fromkeys(SYSTEM_PATHS["omni"], omni))
                order = [p for p in INTERLEAVED if p in paths]
                for w in group:
                    rounds = [
                        {
                            p: run_loadgens(w, p, systems[p], procs, scale, args.clients)
                            for p in order
                        }
                        for _ in range(args.repeat)
                    ]
                    res.rows[w.name] = [
                        median_row([r[p] for r in rounds]) for p in PATHS if p in order
                    ]
        if "workers" in selected:
            res.workers_flag = coordinator_supports("--workers")
            if not res.workers_flag:
                note = (
                    "`--workers`: the coordinator has no such flag yet "
                    "(`omni-coordinator --help`), so the workers comparison was skipped."
                )
                res.notes.append(note)
                print("  " + note, flush=True)
            else:
                for w in (w for w in WORKLOADS if w.name in WORKERS_ON):
                    print(f"omni --workers 1 and --workers 2: {w.name}", flush=True)
                    with contextlib.ExitStack() as stacks:
                        clusters: dict[int, Stack] = {}
                        for n in (1, 2):
                            clusters[n], _ = start_omni_stack(
                                w.timing, ["--workers", str(n)], log_dir
                            )
                            stacks.callback(clusters[n].stop)
                        by_workers = [
                            {
                                n: run_loadgens(
                                    w,
                                    "omni-routed",
                                    clusters[n],
                                    procs,
                                    scale,
                                    args.clients,
                                    label=f"omni routed, --workers {n}",
                                )
                                for n in (1, 2)
                            }
                            for _ in range(args.repeat)
                        ]
                    res.workers[w.name] = [median_row([r[n] for r in by_workers]) for n in (1, 2)]
        if "idle" in selected:
            seconds = args.idle_seconds or (QUICK_IDLE_SECONDS if args.quick else IDLE_SECONDS)
            print(f"{IDLE_AGENTS} idle agents for {seconds:.0f} s", flush=True)
            res.idle = run_idle(log_dir, procs, seconds, [])
            if res.workers_flag is None:
                res.workers_flag = coordinator_supports("--workers")
            if res.workers_flag:
                print(f"{IDLE_AGENTS} idle agents, coordinator --workers 2", flush=True)
                res.idle_workers = run_idle(log_dir, procs, seconds, ["--workers", "2"])
    except BaseException:
        print(f"bench-peers: logs kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        procs.stop()
    res.duration_s = time.perf_counter() - started
    shutil.rmtree(log_dir, ignore_errors=True)
    return res


# --- the report --------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def rows_table(rows: Sequence[Row]) -> str:
    headers = [
        "path", "requests", "errors", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms", "tokens/s",
        "streams/s", "msgs/request", "load gen CPU %", "router CPU %", "backends CPU %",
        "other CPU %",
    ]  # fmt: skip
    body = [
        [
            r.label,
            str(r.requests),
            str(r.errors),
            fmt(r.ttft_mean_ms),
            fmt(r.ttft_p50_ms),
            fmt(r.ttft_p99_ms),
            f"{r.tokens_per_s:.0f}",
            f"{r.streams_per_s:.0f}",
            fmt(r.msgs_per_request, 1),
            f"{r.loadgen_cpu:.0f}",
            f"{r.router_cpu:.0f}",
            f"{r.backends_cpu:.0f}",
            f"{r.other_cpu:.0f}",
        ]
        for r in rows
    ]
    return render_table(headers, body)


def by_path(rows: Sequence[Row]) -> dict[str, Row]:
    return {r.path: r for r in rows}


# The routed paths side by side: vllm-router over HTTP, ours over HTTP and over gRPC.
SUMMARY_PATHS = {
    "vllm-router": "vllm-router HTTP",
    "omni-http": "omni-rpc HTTP",
    "omni-routed": "omni-rpc gRPC",
}


def summary_table(res: Results) -> str:
    """Every workload's routed paths, each against vllm-router's."""
    headers = [
        "workload", "path", "errors", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms", "tokens/s",
        "tokens/s vs vllm-router", "TTFT p50 vs vllm-router", "TTFT p99 vs vllm-router",
    ]  # fmt: skip
    body = []
    for w in WORKLOADS:
        p = by_path(res.rows.get(w.name, []))
        vr = p.get("vllm-router")
        for path, label in SUMMARY_PATHS.items():
            r = p.get(path)
            if r is None:
                continue
            versus = [
                f"{fmt(ratio(a, b))}x" if vr else "-"
                for a, b in (
                    (r.tokens_per_s, vr.tokens_per_s if vr else 0.0),
                    (r.ttft_p50_ms, vr.ttft_p50_ms if vr else 0.0),
                    (r.ttft_p99_ms, vr.ttft_p99_ms if vr else 0.0),
                )
            ]
            body.append(
                [
                    w.name,
                    label,
                    str(r.errors),
                    fmt(r.ttft_mean_ms),
                    fmt(r.ttft_p50_ms),
                    fmt(r.ttft_p99_ms),
                    f"{r.tokens_per_s:.0f}",
                    *versus,
                ]
            )
    return render_table(headers, body) if body else "_Not run._"


@dataclass(frozen=True)
class Target:
    workload: str
    what: str
    measured: str
    met: bool | None  # None: not measured


# Ours against vllm-router: over HTTP (the same client for both) and over gRPC.
OURS = (("omni-http", "omni HTTP"), ("omni-routed", "omni gRPC"))


def targets(res: Results) -> list[Target]:
    out: list[Target] = []
    nan = float("nan")

    def versus(workload: str, path: str, metric: str) -> float:
        """``path``'s ``metric`` over vllm-router's in ``workload`` (NaN: not measured)."""
        rows = by_path(res.rows.get(workload, []))
        ours, theirs = rows.get(path), rows.get("vllm-router")
        if ours is None or theirs is None:
            return nan
        return ratio(getattr(ours, metric), getattr(theirs, metric))

    def check(value: float, limit: float, at_least: bool) -> bool | None:
        if value != value:
            return None
        return value >= limit if at_least else value <= limit

    def target(workload: str, what: str, value: float, limit: float, at_least: bool) -> Target:
        measured = "-" if value != value else f"{fmt(value)}x"
        return Target(workload, what, measured, check(value, limit, at_least))

    for path, name in OURS:
        tok = versus("paced", path, "tokens_per_s")
        p50 = versus("paced", path, "ttft_p50_ms")
        p99 = versus("paced", path, "ttft_p99_ms")
        out += [
            target("paced", f"{name} tokens/s >= 0.95x vllm-router's", tok, 0.95, True),
            target("paced", f"{name} TTFT p50 <= 2x vllm-router's", p50, 2.0, False),
            target("paced", f"{name} TTFT p99 <= 2x vllm-router's", p99, 2.0, False),
        ]
    latency = by_path(res.rows.get("latency", []))
    om, od = latency.get("omni-routed"), latency.get("omni-direct")
    added = om.ttft_p50_ms - od.ttft_p50_ms if om and od else nan
    out.append(
        Target("latency", "omni added TTFT p50 (gRPC routed - direct) <= 0.5 ms",
               f"{fmt(added)} ms", check(added, 0.5, False))
    )  # fmt: skip
    for path, name in OURS:
        tok = versus("throughput", path, "tokens_per_s")
        out.append(target("throughput", f"{name} tokens/s >= 0.75x vllm-router's", tok, 0.75, True))
    for path, name in OURS:
        streams = versus("streams", path, "streams_per_s")
        out.append(target("streams", f"{name} streams/s >= 0.5x vllm-router's", streams, 0.5, True))
    idle = res.idle.coordinator_cpu if res.idle else nan
    out.append(
        Target("idle", f"{IDLE_AGENTS} idle agents: coordinator CPU <= 5% of one core",
               "-" if idle != idle else f"{fmt(idle)}%", check(idle, 5.0, False))
    )  # fmt: skip
    return out


def comparison_lines(workload: str, rows: Sequence[Row]) -> list[str]:
    p = by_path(rows)
    vr, md, oh, om, od = (p.get(k) for k in PATHS)
    lines = []
    for ours, name in ((oh, "omni HTTP"), (om, "omni gRPC")):
        if vr and ours:
            lines.append(
                f"- {name}/vllm-router (routed): tokens/s "
                f"{fmt(ratio(ours.tokens_per_s, vr.tokens_per_s))}x, streams/s "
                f"{fmt(ratio(ours.streams_per_s, vr.streams_per_s))}x, TTFT mean "
                f"{fmt(ratio(ours.ttft_mean_ms, vr.ttft_mean_ms))}x, p50 "
                f"{fmt(ratio(ours.ttft_p50_ms, vr.ttft_p50_ms))}x, p99 "
                f"{fmt(ratio(ours.ttft_p99_ms, vr.ttft_p99_ms))}x."
            )
    if oh and om:
        lines.append(
            f"- omni HTTP against omni gRPC: tokens/s "
            f"{fmt(ratio(oh.tokens_per_s, om.tokens_per_s))}x, TTFT p50 "
            f"{oh.ttft_p50_ms - om.ttft_p50_ms:+.2f} ms, coordinator CPU "
            f"{oh.router_cpu:.0f}% against {om.router_cpu:.0f}%."
        )
    if md and od:
        lines.append(
            f"- direct (no router): agents/mock workers tokens/s "
            f"{fmt(ratio(od.tokens_per_s, md.tokens_per_s))}x, streams/s "
            f"{fmt(ratio(od.streams_per_s, md.streams_per_s))}x."
        )
    if vr and md and om and od:
        lines.append(
            f"- added by the router (routed - direct), TTFT p50: vllm-router "
            f"{vr.ttft_p50_ms - md.ttft_p50_ms:+.2f} ms, omni coordinator (gRPC) "
            f"{om.ttft_p50_ms - od.ttft_p50_ms:+.2f} ms; routed/direct tokens/s: vllm-router "
            f"{fmt(ratio(vr.tokens_per_s, md.tokens_per_s))}x, omni (gRPC) "
            f"{fmt(ratio(om.tokens_per_s, od.tokens_per_s))}x."
        )
    errors = [f"- {r.label}: {e}" for r in rows for e in r.error_samples[:2]]
    if errors:
        lines += ["- errors (first of each path):", *("  " + e for e in errors)]
    return lines


def render_section(res: Results) -> str:
    m = res.machine
    parts = [
        SECTION_TITLE,
        "",
        "Generated by `make bench-peers` (`.venv/bin/python scripts/bench_peers.py`); "
        "`--quick` for a short smoke run, `--only NAME[,NAME]` for some workloads "
        f"({', '.join(CHOICES)}; the others keep their last results).",
        "",
        "Two systems on this machine, each with two backends that run the same simulated "
        "engine (`node_agent/engines/sim.py`, the engine object itself, so output and timing "
        "match token for token):",
        "",
        f"- **vllm-router** {res.vllm_router_version} (from PyPI, in its own virtual "
        "environment under the omni-rpc cache folder; `--policy round_robin`) in front of two "
        "mock OpenAI workers (`scripts/mock_openai_worker.py`: aiohttp, `/v1/completions` "
        "streamed as SSE, one event per token);",
        "- **omni-rpc**: the coordinator (`--strategy round_robin`, with its OpenAI-compatible "
        "front door `--http-listen`) in front of two `sim` node agents.",
        "",
        "Each workload runs five ways: vllm-router routed (HTTP), the mock workers direct "
        "(HTTP), omni routed over HTTP (the coordinator's `POST /v1/completions`), omni routed "
        "over gRPC (`omni.v1.Coordinator/Generate`) and the agents direct "
        "(`omni.v1.NodeAgent/Generate`). Load generators are separate processes (one aiohttp "
        "SSE client for every HTTP path, grpc.aio clients for the gRPC ones; "
        f"{res.clients} process(es) per measurement), closed loop: each of the "
        "workload's concurrent streams sends its next request when the last one ends. Both "
        "systems stay up while a workload runs and its paths are measured one after the "
        "other in the order vllm-router, omni HTTP, omni gRPC, mock direct, omni direct"
        + (f", {res.repeat} times, the tables giving medians" if res.repeat > 1 else "")
        + ", so that other work on the machine weighs on both alike. After a "
        "warm-up, a fixed window is measured: tokens/s counts tokens received in the window, "
        "streams/s requests completed in it, TTFT (request sent to first token) is over the "
        "requests that started and ended in it. The engines run with `itl_growth` 0 and "
        "`max_concurrency` 256 (no slow-down with load, no queueing). CPU is read from "
        "`/proc` for each process tree around the window, as % of one core: *router* is "
        "vllm-router or the coordinator (all its processes), *backends* the two mock workers "
        "or the two agents, *other* the rest of the machine (noise). Every process shares "
        f"the same {m.get('cores', '?')} cores, so the load generators' CPU is taken from "
        "the systems under test: compare paths within a workload, not across machines.",
        "",
        "HTTP against HTTP: vllm-router speaks only HTTP, so the like-for-like comparison is "
        "with the coordinator's own OpenAI-compatible front door (`omni-coordinator "
        "--http-listen`, `POST /v1/completions` streamed as SSE chunks ending `data: [DONE]`, as "
        "vLLM's server does), driven by the very same load generator: one aiohttp client, the "
        "same plain OpenAI request bodies (`stream`, `stream_options.include_usage`, no "
        "extensions), the same parsing. Behind its front door the coordinator still reaches the "
        "agents over gRPC, so *omni HTTP* is client, HTTP, coordinator, gRPC, agent, against "
        "vllm-router's client, HTTP, router, HTTP, worker; *omni gRPC* is omni's native path, "
        "kept for reference. Tokens are counted the same way on every HTTP path: a chunk with "
        "text counts one token when it arrives, and each request's count is then set to its "
        "final usage chunk's `completion_tokens` (gRPC responses count their `token_ids`); TTFT "
        "is the time to the first chunk or response that carries a token. The mock workers "
        "send one chunk per engine step, one token, so for them the two counts agree; the "
        "coordinator forwards the agents' messages, which carry several tokens when these come "
        "out together, so it may send fewer, larger chunks for the same tokens (*msgs/request*: "
        "messages that carried tokens, per request), and the rest of its tokens are credited "
        "when each request ends, which over a steady window adds up the same.",
        "",
        f"- Date: {res.when}; took {res.duration_s:.0f} s{' (--quick)' if res.quick else ''}.",
        f"- Command: `{res.command}`",
        f"- Machine: {m.get('cores', '?')} cores ({m.get('cpu', '?')}), Python "
        f"{m.get('python', '?')}, grpcio {m.get('grpcio', '?')}, aiohttp {m.get('aiohttp', '?')}, "
        f"{m.get('platform', '?')}; load average before: {m.get('load_before', '?')}.",
        "",
        "Reading the numbers: vllm-router is compiled Rust (one multi-threaded process), the "
        "coordinator a Python grpc.aio process, so the *router CPU %* column at a similar "
        "tokens/s is the cost per message of each. The *direct* rows compare the backends "
        "themselves (aiohttp SSE against the agents' gRPC streams), which the routed rows "
        "include. When *other CPU %* is far from 0, other work on the machine took cores from "
        "every process here during that window: absolute numbers then understate both "
        "systems, and routed against direct of the same system, measured a few seconds apart, "
        "is the steadier comparison.",
        "",
    ]
    parts += [
        "### vllm-router HTTP, omni-rpc HTTP, omni-rpc gRPC",
        "",
        "The routed paths of every workload; the ratios are each path's number over "
        "vllm-router's (tokens/s: higher is better; TTFT: lower is better).",
        "",
        summary_table(res),
        "",
        "### Targets",
        "",
    ]
    parts.append(
        render_table(
            ["workload", "target", "measured", "result"],
            [
                [
                    t.workload,
                    t.what,
                    t.measured,
                    "not measured" if t.met is None else ("met" if t.met else "NOT met"),
                ]
                for t in targets(res)
            ],
        )
    )
    for w in WORKLOADS:
        rows = res.rows.get(w.name)
        parts += ["", f"### `{w.name}`: {w.title}, {w.timing.describe()}", ""]
        if not rows:
            parts.append("_Not run._")
            continue
        parts += [rows_table(rows), "", *comparison_lines(w.name, rows)]
    parts += [
        "",
        "### Coordinator `--workers 1` vs `--workers 2` (omni routed)",
        "",
        "Two clusters (each a coordinator and two agents) up at once, measured one after the "
        f"other; with {m.get('cores', '?')} cores shared by every process, a second worker "
        "process only helps when a core is left over for it.",
        "",
    ]
    if res.workers:
        for name, rows in res.workers.items():
            workload = next(w for w in WORKLOADS if w.name == name)
            parts += [f"`{name}` ({workload.title}, {workload.timing.describe()}):", ""]
            parts += [rows_table(rows), ""]
            if len(rows) == 2:
                parts.append(
                    f"- `--workers 2` / `--workers 1`: tokens/s "
                    f"{fmt(ratio(rows[1].tokens_per_s, rows[0].tokens_per_s))}x, TTFT p50 "
                    f"{fmt(ratio(rows[1].ttft_p50_ms, rows[0].ttft_p50_ms))}x."
                )
                parts.append("")
    else:
        parts.append("_Not run._")
    parts += [
        "",
        f"### {IDLE_AGENTS} idle agents",
        "",
    ]
    if res.idle:
        i = res.idle
        parts.append(
            f"{i.agents} real node agents (`node_agent.main.serve`, the agent's own server, "
            f"health service and membership loop, `sim` engine), {i.agents // i.agent_processes} "
            f"per process in {i.agent_processes} processes (an agent embedded as the Ray "
            "launcher does), joined to one coordinator "
            f"(health checks every {i.health_check_interval_s:g} s, plus a health Watch stream "
            f"per node and the agents' periodic re-join) and left idle for {i.seconds:.0f} s: "
            f"the coordinator ({i.coordinator_processes} process(es)) used "
            f"**{i.coordinator_cpu:.2f}% of one core**; the agent host processes "
            f"{i.agents_cpu:.1f}%."
        )
        if res.idle_workers:
            iw = res.idle_workers
            parts += [
                "",
                f"With `{' '.join(iw.coordinator_args)}` (a control process and its workers), "
                f"the same test ({iw.seconds:.0f} s): **{iw.coordinator_cpu:.2f}% of one core** "
                f"summed over the {iw.coordinator_processes} coordinator processes.",
            ]
    else:
        parts.append("_Not run._")
    if res.notes:
        parts += ["", "### Notes", "", *(f"- {n}" for n in res.notes)]
    return "\n".join(parts) + "\n"


def previous_results(path: Path) -> Results | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if DATA_PREFIX not in text:
        return None
    data = text.split(DATA_PREFIX, 1)[1].split(" -->", 1)[0]
    try:
        return Results.from_json(data)
    except (ValueError, TypeError, KeyError):
        return None


def merge(old: Results | None, new: Results, ran: set[str]) -> Results:
    """``new``, with the workloads it did not run taken from ``old``, and in the ones it ran,
    the paths it did not measure (``--systems``, no HTTP front door), with a note."""
    if old is None:
        return new
    for name, rows in old.rows.items():
        if name not in ran or name not in new.rows:
            new.rows.setdefault(name, rows)
            continue
        have = {r.path for r in new.rows[name]}
        kept = [r for r in rows if r.path in PATHS and r.path not in have]
        if kept:
            new.rows[name] = sorted([*new.rows[name], *kept], key=lambda r: PATHS.index(r.path))
            new.notes.append(
                f"`{name}`: {', '.join(r.label for r in kept)} from the previous run "
                f"({old.when}), not measured in this one."
            )
    if "workers" not in ran:
        new.workers, new.workers_flag = old.workers, old.workers_flag
    if "idle" not in ran and new.idle is None:
        new.idle, new.idle_workers = old.idle, old.idle_workers
    return new


def write_section(path: Path, res: Results) -> None:
    """Put the section into ``path``, replacing its previous version; the rest is kept."""
    body = f"{SECTION_START}\n{render_section(res)}{DATA_PREFIX}{res.to_json()} -->\n{SECTION_END}"
    try:
        text = path.read_text()
    except OSError:
        text = "# Benchmarks\n"
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        tail = rest.split(SECTION_END, 1)[1]
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def print_summary(res: Results) -> None:
    for t in targets(res):
        result = "not measured" if t.met is None else ("met" if t.met else "NOT met")
        print(f"  [{result:>12}] {t.workload:<10} {t.what}: {t.measured}")


def parse_only(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(CHOICES)}"
        )
    return names


def parse_systems(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown system(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SYSTEMS)}"
        )
    return [s for s in SYSTEMS if s in names]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        return loadgen_main(argv[1])
    if argv[:1] == ["idle-agents"]:
        sub = argparse.ArgumentParser(prog="bench_peers.py idle-agents")
        sub.add_argument("--coordinator", required=True)
        sub.add_argument("--count", type=int, default=IDLE_AGENTS_PER_PROCESS)
        sub.add_argument("--prefix", default="idle-")
        a = sub.parse_args(argv[1:])
        asyncio.run(host_agents(a.coordinator, a.count, a.prefix))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="Markdown report to update")
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    parser.add_argument(
        "--only",
        type=parse_only,
        help=f"comma-separated workloads to run ({', '.join(CHOICES)}); default all",
    )
    parser.add_argument(
        "--clients", type=int, default=1, help="load generator processes per measurement"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each path this many times (interleaved) and report the medians",
    )
    parser.add_argument(
        "--systems",
        type=parse_systems,
        default=list(SYSTEMS),
        help="comma-separated systems to measure (vllm: vllm-router and its mock workers; "
        "omni: the coordinator over HTTP and gRPC, the agents); default vllm,omni",
    )
    parser.add_argument("--idle-seconds", type=float, help="idle window (default 60, quick 10)")
    parser.add_argument("--vllm-router-version", default=VLLM_ROUTER_VERSION)
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the section from the results stored in --out, running nothing",
    )
    args = parser.parse_args(argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        print("bench-peers needs aiohttp in the project's environment", file=sys.stderr)
        return 1
    if args.render_only:
        stored = previous_results(args.out)
        if stored is None:
            print(f"no stored results in {args.out}", file=sys.stderr)
            return 1
        write_section(args.out, stored)
        print_summary(stored)
        return 0
    # SIGTERM: unwind through the finally blocks that stop every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        res = run(args)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"bench-peers failed: {exc}", file=sys.stderr)
        return 1
    ran = set(args.only or CHOICES)
    res = merge(previous_results(args.out), res, ran)
    write_section(args.out, res)
    print("\ntargets:")
    print_summary(res)
    print(f"\nwrote {args.out} ({res.duration_s:.0f} s)")
    failed = sum(r.errors for r in _iter_rows(res))
    return 1 if failed else 0


def _iter_rows(res: Results) -> Iterator[Row]:
    for rows in (*res.rows.values(), *res.workers.values()):
        yield from rows


if __name__ == "__main__":
    sys.exit(main())
