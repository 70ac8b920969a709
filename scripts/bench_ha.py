"""Two coordinators over four agents: how evenly each strategy spreads mixed-length requests.

``make bench-ha`` (``.venv/bin/python scripts/bench_ha.py``) starts, on this machine, local
clusters of four ``sim`` node agents (``LocalCluster``), each agent joined to every coordinator
of its cluster:

* ``least_loaded``, ``round_robin`` and ``power_of_two``: two coordinators each;
* ``least_loaded`` behind one coordinator: the ideal, one router that sees every request.

Every cluster gets the same workload: ``--requests`` (200) requests whose ``max_tokens`` are
drawn from a seeded log-uniform distribution over 10..200 tokens (many short requests, a few
long ones; ``--seed``), so that a balance by request count alone is not a balance of work. With
two coordinators the requests are split exactly: the even-numbered ones go to the first
coordinator, the odd-numbered ones to the second, each through its own gRPC client
(``omni.v1.Coordinator/Generate``). The load is a closed loop of ``--concurrency`` (64) streams
in flight, half on each coordinator: each stream sends its coordinator's next request as soon as
its last one ends, until all are done.

Every agent's ``NodeAgent.GetLoad`` is sampled every ~20 ms during the run (``requests``: what
the agent holds, from every coordinator; addresses from the coordinator's ``ListNodes``), and
its counters are read before and after. Per agent: requests served, tokens generated, the peak
of its concurrent requests and their time average (sample and hold) under full load, from the
first request sent until the first coordinator has no request left to send (every stream busy
until then; what follows is the drain, where no routing decision is left to make), and over the
whole run. The imbalance of each is max/mean over the four agents (1.00: perfectly even).
Before each run, each coordinator sends a few 1-token requests (not counted) so that its
sessions to the agents, and with them the agents' load reports, are up.

All clusters are started at once and stay up; a round runs the setups one after the other and
the round is repeated ``--repeat`` times (3), so that the spread between runs shows. The claim
(``TOLERANCE_*``) is judged on every run of ``least_loaded`` with two coordinators.

The report goes into docs/benchmarks.md, section "Two coordinators: balance under
``least_loaded``" (between ``<!-- bench:ha:start -->`` and ``<!-- bench:ha:end -->``; the rest
of the file is kept); ``--out PATH`` writes another file, ``--no-doc`` none. ``--quick`` is a
smoke run (40 requests of 5..40 tokens at 5 ms per token, 16 in flight, one round), too small
for the claim to be judged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from omni_rpc import config
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    node_agent_pb2,
    node_agent_pb2_grpc,
    node_pb2,
)

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "benchmarks.md"
SECTION_START = "<!-- bench:ha:start -->"
SECTION_END = "<!-- bench:ha:end -->"
DATA_PREFIX = "<!-- bench:ha:data "
SECTION_TITLE = "## Two coordinators: balance under `least_loaded`"

NUM_NODES = 4
STARTUP_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 120.0
SAMPLE_INTERVAL_S = 0.02
# 1-token requests per agent each coordinator sends before a run (not measured).
WARMUP_PER_NODE = 2
NUM_PROMPTS = 32
PROMPTS = [f"ha benchmark prompt {k}: route me to the least busy node" for k in range(NUM_PROMPTS)]

# The claim, judged on every run of least_loaded with two coordinators: each agent's
# time-averaged concurrent requests under full load, and its tokens generated, within these
# fractions of the mean over the agents (max/mean <= 1 + tolerance). Set with margin from what
# was measured when the benchmark was written (TOLERANCE_BASIS); round_robin, blind to the
# lengths, misses the first in most runs.
TOLERANCE_MEAN_CONCURRENCY = 0.10
TOLERANCE_TOKENS = 0.20
TOLERANCE_BASIS = (
    "set with margin from the first 13 runs, on the 2-core machine below, when this benchmark "
    "was added: concurrency under full load 1.01 to 1.03 in 11 of them, 1.06 and 1.08 in 2 "
    "taken while other work loaded the machine heavily (load average 10 to 16), against 1.07 "
    "to 1.14 for round_robin; tokens 1.03 to 1.11, the one-coordinator ideal's up to 1.15 "
    "(tokens depend on where the few long requests land, and the strategies count requests, "
    "not their max_tokens)"
)

CLAIMED_SETUP = "least_loaded"


# --- what is run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    requests: int
    # Streams in flight at a time over all coordinators (split evenly between them).
    concurrency: int
    min_tokens: int
    max_tokens: int
    ttft_ms: float
    itl_ms: float
    seed: int = 42

    def lengths(self) -> list[int]:
        """Each request's ``max_tokens``: log-uniform over min..max (many short requests, a
        few long ones), from ``seed``."""
        rng = random.Random(self.seed)
        low, high = math.log(self.min_tokens), math.log(self.max_tokens)
        return [round(math.exp(rng.uniform(low, high))) for _ in range(self.requests)]

    def agent_args(self) -> list[str]:
        # No slow-down with load and no queueing: an agent's concurrency is what it was given.
        return [
            "--sim-ttft-ms", str(self.ttft_ms),
            "--sim-itl-ms", str(self.itl_ms),
            "--sim-itl-growth", "0",
            "--sim-max-concurrency", "256",
        ]  # fmt: skip

    def describe(self) -> str:
        return (
            f"{self.requests} requests, max_tokens log-uniform "
            f"{self.min_tokens}..{self.max_tokens} (seed {self.seed}), {self.concurrency} in "
            f"flight; agents: TTFT {self.ttft_ms:g} ms, {self.itl_ms:g} ms per token"
        )


FULL = Workload(requests=200, concurrency=64, min_tokens=10, max_tokens=200, ttft_ms=20, itl_ms=20)
QUICK = Workload(requests=40, concurrency=16, min_tokens=5, max_tokens=40, ttft_ms=5, itl_ms=5)


@dataclass(frozen=True)
class Setup:
    name: str
    strategy: str
    coordinators: int
    label: str


SETUPS = (
    Setup("least_loaded", "least_loaded", 2, "least_loaded, 2 coordinators"),
    Setup("round_robin", "round_robin", 2, "round_robin, 2 coordinators"),
    Setup("power_of_two", "power_of_two", 2, "power_of_two, 2 coordinators"),
    Setup("single", "least_loaded", 1, "least_loaded, 1 coordinator (ideal)"),
)
SETUP_NAMES = tuple(s.name for s in SETUPS)


# --- what is measured --------------------------------------------------------------------------


@dataclass
class AgentStats:
    node_id: str
    # The agent's own counters over the run: requests finished, tokens generated.
    served: int = 0
    tokens: int = 0
    # Sampled ``NodeLoad.requests``: the most at once; the time average while every stream
    # was busy (until the first coordinator ran out of requests), and over the whole run
    # (the final drain included).
    peak: int = 0
    mean: float = 0.0
    mean_all: float = 0.0
    # Requests whose responses named this node, by coordinator (index).
    by_coordinator: list[int] = field(default_factory=list)


@dataclass
class Run:
    setup: str
    label: str
    strategy: str
    coordinators: int
    round: int
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    # From the first request sent until the first coordinator ran out of requests to send:
    # every stream busy (the rest of wall_s is the drain).
    full_s: float = 0.0
    samples: int = 0
    # The mean interval between samples achieved, in milliseconds.
    sample_ms: float = 0.0
    # The most requests any agent had waiting behind its concurrency limit (0: none queued).
    max_waiting: int = 0
    # CPU over the run, % of one core: this process and every cluster's (the benchmark), and
    # the rest of the machine (other work, which delays the processes measured here).
    ours_cpu: float = 0.0
    other_cpu: float = 0.0
    agents: list[AgentStats] = field(default_factory=list)

    def imbalance(self, metric: str) -> float:
        """max/mean over the agents of ``metric`` (an AgentStats field); NaN when all 0."""
        values = [float(getattr(a, metric)) for a in self.agents]
        average = sum(values) / len(values) if values else 0.0
        return max(values) / average if average > 0 else float("nan")


@dataclass
class Results:
    when: str = ""
    command: str = ""
    duration_s: float = 0.0
    quick: bool = False
    workload: dict[str, Any] = field(default_factory=dict)
    rounds: int = 1
    runs: list[Run] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Results:
        data = json.loads(text)
        runs = [
            Run(**{**r, "agents": [AgentStats(**a) for a in r["agents"]]})
            for r in data.pop("runs", [])
        ]
        return cls(**data, runs=runs)

    def of(self, setup: str) -> list[Run]:
        return [r for r in self.runs if r.setup == setup]


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "load_before": load,
    }


# --- CPU from /proc -----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # After "pid (comm)": ppid is field 4, utime 14, stime 15 (1-based).
    return stat.rsplit(")", 1)[1].split()


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds so far of ``root`` and every process below it."""
    parents: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    total = 0
    for pid in found:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def machine_busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS


# --- clusters ----------------------------------------------------------------------------------


@dataclass
class Cluster:
    setup: Setup
    cluster: LocalCluster
    # node_id -> the agent's address, sorted by node_id.
    agents: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None


def wait_healthy(cluster: LocalCluster) -> dict[str, str]:
    """Every agent's address by node id, once every coordinator lists all as healthy."""
    from omni_rpc.sdk.client import CoordinatorClient

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    agents: dict[str, str] = {}
    for address in cluster.coordinator_addresses:
        client = CoordinatorClient(address, timeout_s=5.0)
        try:
            while True:
                cluster.check_alive()
                try:
                    nodes = client.nodes()
                except ConnectionError:
                    nodes = []
                healthy = [n for n in nodes if n.state == coordinator_pb2.NODE_STATE_HEALTHY]
                if len(healthy) >= NUM_NODES:
                    agents = {
                        n.node_id: n.address for n in sorted(healthy, key=lambda n: n.node_id)
                    }
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{address}: only {len(healthy)} of {NUM_NODES} nodes healthy in time"
                    )
                time.sleep(0.1)
        finally:
            client.close()
    return agents


def start_clusters(setups: Sequence[Setup], workload: Workload, log_dir: Path) -> list[Cluster]:
    """One cluster per setup, all started at once (each in a thread); every one is returned,
    started or not, so that the caller stops them all."""
    clusters = [
        Cluster(
            setup,
            LocalCluster(
                num_nodes=NUM_NODES,
                num_coordinators=setup.coordinators,
                strategy=setup.strategy,
                agent_args=workload.agent_args(),
                log_dir=Path(tempfile.mkdtemp(prefix=f"{setup.name}-", dir=log_dir)),
            ),
        )
        for setup in setups
    ]

    def start(c: Cluster) -> None:
        try:
            c.cluster.start(startup_timeout_s=STARTUP_TIMEOUT_S)
            c.agents = wait_healthy(c.cluster)
        except BaseException as exc:  # re-raised in the main thread below
            c.error = exc

    threads = [threading.Thread(target=start, args=(c,), daemon=True) for c in clusters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clusters:
        if c.error is not None:
            stop_clusters(clusters)
            raise RuntimeError(f"{c.setup.label}: {c.error}") from c.error
    return clusters


def stop_clusters(clusters: Sequence[Cluster]) -> None:
    """Stop every cluster, all at once."""
    threads = [threading.Thread(target=c.cluster.stop, daemon=True) for c in clusters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- one run -----------------------------------------------------------------------------------


async def get_loads(stubs: Sequence[Any]) -> list[node_pb2.NodeLoad]:
    return list(
        await asyncio.gather(
            *(s.GetLoad(node_agent_pb2.GetLoadRequest(), timeout=5.0) for s in stubs)
        )
    )


async def measure(c: Cluster, workload: Workload, round_: int) -> Run:
    """Send the workload through ``c``'s coordinators while sampling its agents."""
    setup = c.setup
    node_ids = list(c.agents)
    run = Run(setup.name, setup.label, setup.strategy, setup.coordinators, round_)
    channels = [
        grpc.aio.insecure_channel(a, options=config.GRPC_MESSAGE_OPTIONS)
        for a in c.cluster.coordinator_addresses
    ]
    agent_channels = [grpc.aio.insecure_channel(a) for a in c.agents.values()]
    try:
        coordinators = [coordinator_pb2_grpc.CoordinatorStub(ch) for ch in channels]
        agents = [node_agent_pb2_grpc.NodeAgentStub(ch) for ch in agent_channels]
        tag = f"ha-{setup.name}-{round_}-{time.monotonic_ns()}"

        async def call(coordinator: int, request_id: str, max_tokens: int, seed: int) -> str:
            """One request to the end; the node that finished it."""
            request = generate_pb2.GenerateRequest(
                request_id=request_id,
                prompt=PROMPTS[seed % NUM_PROMPTS],
                sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, seed=seed),
            )
            stream = coordinators[coordinator].Generate(request, timeout=REQUEST_TIMEOUT_S)
            tokens, node, finish = 0, "", ""
            try:
                async for response in stream:
                    tokens += len(response.token_ids)
                    node = response.node_id or node
                    finish = response.finish_reason or finish
            finally:
                stream.cancel()
            if finish != "length" or tokens != max_tokens:
                raise RuntimeError(f"ended with {finish!r} after {tokens} of {max_tokens} tokens")
            return node

        # Sessions and load reports up before the run.
        for k in range(len(coordinators)):
            for w in range(WARMUP_PER_NODE * NUM_NODES):
                await call(k, f"{tag}-warmup-{k}-{w}", 1, w)
        await asyncio.sleep(2 * config.LOAD_REPORT_INTERVAL_S)

        lengths = workload.lengths()
        n = len(coordinators)
        queues = [list(range(k, workload.requests, n))[::-1] for k in range(n)]
        served = {node: [0] * n for node in node_ids}
        done = asyncio.Event()
        samples: list[tuple[float, list[node_pb2.NodeLoad]]] = []

        # When each coordinator's queue ran out: until the first does, every stream is busy.
        emptied: list[float] = []

        async def client(k: int) -> None:
            while queues[k]:
                index = queues[k].pop()
                if not queues[k]:
                    emptied.append(time.perf_counter())
                try:
                    node = await call(k, f"{tag}-{index}", lengths[index], index)
                except (grpc.aio.AioRpcError, RuntimeError) as exc:
                    run.errors += 1
                    if len(run.error_samples) < 5:
                        detail = (
                            f"{exc.code().name}: {exc.details()}"
                            if isinstance(exc, grpc.aio.AioRpcError)
                            else str(exc)
                        )
                        run.error_samples.append(detail[:300])
                else:
                    run.requests += 1
                    if node in served:
                        served[node][k] += 1

        async def sample() -> None:
            start = time.perf_counter()
            tick = 0
            while not done.is_set():
                at = time.perf_counter()
                samples.append((at, await get_loads(agents)))
                tick += 1
                delay = start + tick * SAMPLE_INTERVAL_S - time.perf_counter()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), max(0.0, delay))
            samples.append((time.perf_counter(), await get_loads(agents)))

        before = await get_loads(agents)
        ours_before, machine_before = tree_cpu_s(os.getpid()), machine_busy_cpu_s()
        sampler = asyncio.create_task(sample())
        await asyncio.sleep(0)  # the first sample goes before the first request
        started = time.perf_counter()
        per = [
            workload.concurrency // n + (1 if k < workload.concurrency % n else 0) for k in range(n)
        ]
        await asyncio.gather(*(client(k) for k in range(n) for _ in range(per[k])))
        run.wall_s = time.perf_counter() - started
        ours = tree_cpu_s(os.getpid()) - ours_before
        machine = machine_busy_cpu_s() - machine_before
        run.ours_cpu = 100.0 * ours / run.wall_s
        run.other_cpu = 100.0 * max(0.0, machine - ours) / run.wall_s
        done.set()
        await sampler
        await asyncio.sleep(2 * config.LOAD_REPORT_INTERVAL_S)
        after = await get_loads(agents)
    finally:
        for ch in (*channels, *agent_channels):
            await ch.close(None)

    run.samples = len(samples)
    run.sample_ms = 1000.0 * (samples[-1][0] - samples[0][0]) / max(1, len(samples) - 1)
    run.full_s = (min(emptied) if emptied else samples[-1][0]) - started
    for i, node in enumerate(node_ids):
        values = [loads[i].requests for _, loads in samples]
        run.agents.append(
            AgentStats(
                node_id=node,
                served=after[i].finished - before[i].finished,
                tokens=after[i].generated_tokens - before[i].generated_tokens,
                peak=max(values),
                mean=time_average(samples, i, started, started + run.full_s),
                mean_all=time_average(samples, i, started, started + run.wall_s),
                by_coordinator=served[node],
            )
        )
    run.max_waiting = max(loads[i].waiting for _, loads in samples for i in range(len(node_ids)))
    return run


def time_average(
    samples: Sequence[tuple[float, Sequence[node_pb2.NodeLoad]]],
    agent: int,
    start: float,
    end: float,
) -> float:
    """Agent ``agent``'s ``requests`` averaged over [start, end], each sample holding until the
    next one."""
    if end <= start:
        return 0.0
    total = 0.0
    for (at, loads), (following, _) in itertools.pairwise(samples):
        overlap = min(following, end) - max(at, start)
        if overlap > 0:
            total += loads[agent].requests * overlap
    return total / (end - start)


def describe(run: Run) -> str:
    per = " ".join(f"{a.served:>3}/{a.tokens:>5}/{a.peak:>2}/{a.mean:5.2f}" for a in run.agents)
    return (
        f"  round {run.round} {run.label:<36} n={run.requests} err={run.errors} "
        f"{run.wall_s:5.2f} s (full {run.full_s:5.2f} s) cpu% ours {run.ours_cpu:.0f} other "
        f"{run.other_cpu:.0f} | imbalance (max/mean) time-avg "
        f"{fmt(run.imbalance('mean'))} with drain {fmt(run.imbalance('mean_all'))} "
        f"peak {fmt(run.imbalance('peak'))} tokens {fmt(run.imbalance('tokens'))} "
        f"served {fmt(run.imbalance('served'))} | per agent served/tokens/peak/avg: {per}"
    )


def run_all(args: argparse.Namespace) -> Results:
    workload = QUICK if args.quick else FULL
    workload = Workload(
        requests=args.requests or workload.requests,
        concurrency=args.concurrency or workload.concurrency,
        min_tokens=workload.min_tokens,
        max_tokens=workload.max_tokens,
        ttft_ms=workload.ttft_ms,
        itl_ms=workload.itl_ms,
        seed=args.seed,
    )
    rounds = args.repeat or (1 if args.quick else 3)
    setups = [s for s in SETUPS if s.name in (args.only or SETUP_NAMES)]
    res = Results(
        when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(shlex.quote(a) for a in ["scripts/bench_ha.py", *sys.argv[1:]]),
        quick=args.quick,
        workload=asdict(workload),
        rounds=rounds,
        machine=machine_info(),
    )
    log_dir = Path(tempfile.mkdtemp(prefix="omni-bench-ha-"))
    print(f"bench-ha: {workload.describe()}; logs in {log_dir}", flush=True)
    started = time.perf_counter()
    clusters: list[Cluster] = []
    try:
        clusters = start_clusters(setups, workload, log_dir)
        print(f"  {len(clusters)} clusters up in {time.perf_counter() - started:.1f} s", flush=True)
        for round_ in range(1, rounds + 1):
            for c in clusters:
                run = asyncio.run(measure(c, workload, round_))
                c.cluster.check_alive()
                print(describe(run), flush=True)
                res.runs.append(run)
    except BaseException:
        print(f"bench-ha: logs kept in {log_dir}", file=sys.stderr)
        raise
    finally:
        stop_clusters(clusters)
    res.duration_s = time.perf_counter() - started
    with contextlib.suppress(OSError):
        res.machine["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    if not any(r.errors for r in res.runs):
        shutil.rmtree(log_dir, ignore_errors=True)
    return res


# --- the report --------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


METRICS = (
    ("mean", "time-avg concurrency, full load"),
    ("mean_all", "time-avg concurrency, whole run"),
    ("peak", "peak concurrency"),
    ("tokens", "tokens"),
    ("served", "requests served"),
)


def spread(values: Sequence[float], digits: int = 2) -> str:
    """min / median / max (one value: itself)."""
    clean = [v for v in values if v == v]
    if not clean:
        return "-"
    if len(clean) == 1:
        return fmt(clean[0], digits)
    low, mid, high = min(clean), statistics.median(clean), max(clean)
    return f"{fmt(low, digits)} / {fmt(mid, digits)} / {fmt(high, digits)}"


def summary_table(res: Results) -> str:
    """Each setup's imbalances over its runs (min / median / max)."""
    headers = [
        "setup", "runs", "errors", *(f"{label} max/mean" for _, label in METRICS), "wall s",
    ]  # fmt: skip
    body = []
    for setup in SETUPS:
        runs = res.of(setup.name)
        if not runs:
            continue
        body.append(
            [
                setup.label,
                str(len(runs)),
                str(sum(r.errors for r in runs)),
                *(spread([r.imbalance(m) for r in runs]) for m, _ in METRICS),
                spread([r.wall_s for r in runs], 1),
            ]
        )
    return render_table(headers, body) if body else "_Not run._"


def runs_table(res: Results) -> str:
    """Every run, per agent (node-0 first): served, tokens, peak and time-averaged requests."""
    headers = [
        "round", "setup", "errors", "wall s (full load)", "served per agent",
        "tokens per agent", "peak per agent", "time-avg per agent, full load",
        "time-avg max/mean", "whole run max/mean", "peak max/mean", "tokens max/mean",
        "sampled every ms", "CPU % ours", "CPU % other",
    ]  # fmt: skip
    body = [
        [
            str(r.round),
            r.label,
            str(r.errors),
            f"{r.wall_s:.1f} ({r.full_s:.1f})",
            " ".join(str(a.served) for a in r.agents),
            " ".join(str(a.tokens) for a in r.agents),
            " ".join(str(a.peak) for a in r.agents),
            " ".join(fmt(a.mean, 1) for a in r.agents),
            fmt(r.imbalance("mean")),
            fmt(r.imbalance("mean_all")),
            fmt(r.imbalance("peak")),
            fmt(r.imbalance("tokens")),
            fmt(r.sample_ms, 1),
            f"{r.ours_cpu:.0f}",
            f"{r.other_cpu:.0f}",
        ]
        for r in sorted(res.runs, key=lambda r: (SETUP_NAMES.index(r.setup), r.round))
    ]
    return render_table(headers, body) if body else "_Not run._"


@dataclass(frozen=True)
class Verdict:
    what: str
    measured: str
    met: bool | None  # None: not judged


# What is claimed for least_loaded with two coordinators: metric, words, tolerance.
CLAIMS = (
    ("mean", "time-averaged concurrent requests under full load", TOLERANCE_MEAN_CONCURRENCY),
    ("tokens", "tokens generated", TOLERANCE_TOKENS),
)


def verdicts(res: Results) -> list[Verdict]:
    """The claim, on every run of least_loaded with two coordinators (not judged --quick)."""
    runs = res.of(CLAIMED_SETUP)
    out = []
    for metric, label, tolerance in CLAIMS:
        values = [r.imbalance(metric) for r in runs]
        worst = max((v for v in values if v == v), default=float("nan"))
        met: bool | None = None
        if runs and not res.quick:
            met = worst == worst and worst <= 1.0 + tolerance and not any(r.errors for r in runs)
        out.append(
            Verdict(
                f"{label} per agent within {tolerance:.0%} of the mean (max/mean <= "
                f"{1.0 + tolerance:.2f})",
                f"worst of {len(runs)} run(s): {fmt(worst)}" if runs else "-",
                met,
            )
        )
    return out


def verdict_word(v: Verdict) -> str:
    return "not judged" if v.met is None else ("met" if v.met else "NOT met")


def median_imbalance(res: Results, setup: str, metric: str) -> str:
    values = [r.imbalance(metric) for r in res.of(setup)]
    clean = [v for v in values if v == v]
    return fmt(statistics.median(clean)) if clean else "-"


def reading(res: Results) -> list[str]:
    """What the figures of this run say, setup against setup (medians over the rounds)."""
    if not res.of(CLAIMED_SETUP):
        return []
    names = [s.name for s in SETUPS if res.of(s.name)]
    labels = {s.name: s.label for s in SETUPS}

    def medians(metric: str) -> str:
        return ", ".join(f"{labels[n]} {median_imbalance(res, n, metric)}" for n in names)

    return [
        "Here (max/mean, medians over the rounds): time-averaged concurrency under full load "
        f"{medians('mean')}; peak concurrency {medians('peak')}; tokens {medians('tokens')}.",
        "",
        "Reading the numbers: `round_robin` gives every agent the same number of requests from "
        "each coordinator (requests served max/mean 1.00) but not the same work, since the "
        "lengths differ: it is blind to where the long requests went. `least_loaded` sends "
        "each request to the agent with the fewest requests at that moment, its own counted "
        "exactly and the other coordinator's from the agent's last load report (at most "
        f"{config.LOAD_REPORT_INTERVAL_S * 1000:g} ms old), so it is balanced by load, not by "
        "count: an agent that drew short requests serves more of them. The single coordinator "
        "sees every request and is the reference for what two can reach; a small excess in "
        "the peaks with two coordinators is the reports' lag, when both send to the same "
        "agent within one report interval. `power_of_two` compares two random agents, using "
        "the same reports. Under full load every stream is busy and each new request is a "
        "routing decision; in the drain that follows, the last long requests run out where "
        "they were placed, and the strategies count requests, not their `max_tokens`, so the "
        "whole-run and token figures carry some luck of the draw even for the ideal. Every "
        "process shares the same cores: when *CPU % other* is high, other work on the machine "
        "delayed the processes measured here (the load reports, the coordinators, the client's "
        "next requests), and every setup's figures, the ideal's included, move away from 1.00. "
        "The times are this machine's; the ratios are what carries over.",
    ]


def render_section(res: Results) -> str:
    w = Workload(**res.workload)
    m = res.machine
    n_runs = len(res.of(CLAIMED_SETUP))
    judged = verdicts(res)
    claim = (
        f"**Claim: with two coordinators and `least_loaded`, {w.requests} mixed-length requests "
        f"over {NUM_NODES} agents are balanced: every agent's "
        + " and its ".join(
            f"{label} within {tolerance:.0%} of the mean over the agents (max/mean <= "
            f"{1 + tolerance:.2f})"
            for _, label, tolerance in CLAIMS
        )
        + ", in every run.**"
    )
    claim += f" Tolerances {TOLERANCE_BASIS}."
    if res.quick:
        claim += " This was a `--quick` run, too small to judge it."
    elif judged and all(v.met for v in judged):
        claim += f" Met in {n_runs} of {n_runs} runs here."
    else:
        claim += " **Not met in this run**: " + "; ".join(
            f"{v.what}: {v.measured} ({verdict_word(v)})" for v in judged
        )
    parts = [
        SECTION_TITLE,
        "",
        "Generated by `make bench-ha` (`.venv/bin/python scripts/bench_ha.py`, about 2 "
        "minutes); `--quick` for a short smoke run, `--repeat N` for N rounds (default 3), "
        "`--render-only` to rewrite this section from its stored results.",
        "",
        claim,
        "",
        "### What is measured",
        "",
        f"Local clusters of {NUM_NODES} `sim` node agents (`LocalCluster`, every process on this "
        "machine), each agent joined to every coordinator of its cluster: `least_loaded`, "
        "`round_robin` and `power_of_two` behind two coordinators, and `least_loaded` behind "
        "one coordinator, the ideal (one router that sees every request). Each coordinator "
        "knows only its own requests; the agents report their load (`NodeLoad.requests`: "
        "everything they hold, from every coordinator) on each coordinator's session within "
        f"{config.LOAD_REPORT_INTERVAL_S * 1000:g} ms of a change, and `least_loaded` and "
        "`power_of_two` add the other coordinator's requests from those reports to their own.",
        "",
        f"Workload, the same for every setup: {w.requests} requests whose `max_tokens` are "
        f"drawn log-uniformly from {w.min_tokens}..{w.max_tokens} (seed {w.seed}; many short "
        "requests and a few long ones, so that balancing by request count alone does not "
        "balance the work). With two coordinators the requests are split exactly, the "
        "even-numbered ones to the first and the odd-numbered ones to the second, each "
        "coordinator driven by its own gRPC client (`omni.v1.Coordinator/Generate`) at the "
        f"same time. Closed loop, {w.concurrency} requests in flight "
        f"({w.concurrency // 2} per coordinator with two), not all {w.requests} at once: each "
        "stream sends its coordinator's next request as soon as its last one ends, until all "
        f"{w.requests} are done. The agents' engines: TTFT {w.ttft_ms:g} ms, {w.itl_ms:g} ms "
        "per token, no slow-down with load (`--sim-itl-growth 0`) and no queueing "
        "(`--sim-max-concurrency 256`), so an agent's concurrency is exactly what it was "
        "given. Before each run every coordinator sends 1-token requests, "
        f"{WARMUP_PER_NODE} per agent (not counted), so that its sessions, and the load reports "
        "on them, are up.",
        "",
        f"During the run every agent's `NodeAgent.GetLoad` is sampled every "
        f"{SAMPLE_INTERVAL_S * 1000:g} ms (`requests`: what the agent holds; the addresses from "
        "`ListNodes`), and its counters are read before and after. Per agent: requests served "
        "(`finished`), tokens generated (`generated_tokens`), the peak of the sampled "
        "concurrent requests, and their time average (sample and hold, the same window for "
        "every agent of a run) **under full load**, from the first request sent until the "
        "first coordinator has no request left to send (every stream busy: each new request a "
        "routing decision), and over the **whole run** (the final drain included). "
        "**Imbalance** is max/mean over the agents: 1.00 is perfectly even, 1.10 means the "
        "busiest agent had 10% more than the average. All clusters are started at once and "
        "stay up (the idle ones cost little); a round runs the setups one after the other, and "
        f"there were {res.rounds} round(s).",
        "",
        f"- Date: {res.when}; took {res.duration_s:.0f} s{' (--quick)' if res.quick else ''}.",
        f"- Command: `{res.command}`",
        f"- Machine: {m.get('cores', '?')} cores ({m.get('cpu', '?')}), Python "
        f"{m.get('python', '?')}, grpcio {m.get('grpcio', '?')}, {m.get('platform', '?')}; "
        f"load average before: {m.get('load_before', '?')}, after: "
        f"{m.get('load_after', '?')} (other work on the machine takes cores from every "
        "process here: the times suffer, the ratios much less).",
        "",
        "### Imbalance per setup",
        "",
        f"max/mean over the agents; min / median / max over the {res.rounds} round(s).",
        "",
        summary_table(res),
        "",
        "### Claim",
        "",
        render_table(
            ["setup", "claim", "measured", "result"],
            [
                [CLAIMED_SETUP + ", 2 coordinators", v.what, v.measured, verdict_word(v)]
                for v in judged
            ],
        ),
        "",
        "### Every run",
        "",
        "Per agent, node-0 to node-3; *wall s* is the whole run, in brackets its full-load part.",
        "",
        runs_table(res),
        "",
        *reading(res),
    ]
    waiting = max((r.max_waiting for r in res.runs), default=0)
    parts += [
        "",
        f"Requests queued behind an engine's concurrency limit: at most {waiting} in any "
        "sample" + (" (none: every request ran as soon as it arrived)." if waiting == 0 else "."),
    ]
    if any(r.errors for r in res.runs):
        parts += ["", "### Errors", ""]
        for r in res.runs:
            if r.errors:
                parts.append(
                    f"- round {r.round}, {r.label}: {r.errors} ({'; '.join(r.error_samples)})"
                )
    return "\n".join(parts) + "\n"


def stored_results(path: Path, prefix: str, parse: Callable[[str], T]) -> T | None:
    """The results a section of ``path`` keeps in its ``prefix ... -->`` comment, read by
    ``parse``; None when there is none or it no longer parses (an older layout)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if prefix not in text:
        return None
    try:
        return parse(text.split(prefix, 1)[1].split(" -->", 1)[0])
    except (ValueError, TypeError, KeyError):
        return None


def put_section(path: Path, start: str, end: str, body: str) -> None:
    """Put ``start`` + ``body`` + ``end`` into ``path`` in place of the section between those
    markers (appended when there is none); the rest of the file is kept."""
    section = f"{start}\n{body}{end}"
    try:
        text = path.read_text()
    except OSError:
        text = "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def previous_results(path: Path) -> Results | None:
    return stored_results(path, DATA_PREFIX, Results.from_json)


def write_section(path: Path, res: Results) -> None:
    """Put the section into ``path``, replacing its previous version; the rest is kept."""
    body = f"{render_section(res)}{DATA_PREFIX}{res.to_json()} -->\n"
    put_section(path, SECTION_START, SECTION_END, body)


def print_report(res: Results) -> None:
    print("\nimbalance, max/mean over the agents (min / median / max over rounds):")
    print(summary_table(res))
    print("\nclaim:")
    for v in verdicts(res):
        print(f"  [{verdict_word(v):>10}] {CLAIMED_SETUP}, 2 coordinators: {v.what}: {v.measured}")


def parse_only(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETUP_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown setup(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(SETUP_NAMES)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="Markdown report to update")
    parser.add_argument("--no-doc", action="store_true", help="print only, write no report")
    parser.add_argument(
        "--quick", action="store_true", help="40 short requests, one round: a smoke run"
    )
    parser.add_argument("--repeat", type=int, help="rounds of every setup (default 3, quick 1)")
    parser.add_argument("--requests", type=int, help="requests per run (default 200, quick 40)")
    parser.add_argument(
        "--concurrency", type=int, help="requests in flight over all coordinators (64, quick 16)"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the requests' lengths")
    parser.add_argument(
        "--only",
        type=parse_only,
        help=f"comma-separated setups to run ({', '.join(SETUP_NAMES)}); default all",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the section from the results stored in --out, running nothing",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        stored = previous_results(args.out)
        if stored is None:
            print(f"no stored results in {args.out}", file=sys.stderr)
            return 1
        write_section(args.out, stored)
        print_report(stored)
        return 0
    # SIGTERM: unwind through the finally blocks that stop every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        res = run_all(args)
    except RuntimeError as exc:
        print(f"bench-ha failed: {exc}", file=sys.stderr)
        return 1
    print_report(res)
    if not args.no_doc:
        write_section(args.out, res)
        print(f"\nwrote {args.out} ({res.duration_s:.0f} s)")
    return 1 if any(r.errors for r in res.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
