"""Benchmark: what the coordinator adds on top of calling the node agents directly, and what
an agent adds on top of calling vLLM in-process.

One run (``make bench``) has two sections; ``--only sim`` or ``--only vllm`` runs one of them and
keeps the other's part of docs/benchmarks.md. The vllm section (agent overhead: the same vLLM
engine in-process and behind one agent) lives in ``bench_vllm.py``; the rest of this docstring
is about the sim section (coordinator overhead).

The sim section starts a local cluster of a coordinator and three simulated agents and
sends the same workload two ways:

* **direct**: the load generator calls each agent's ``NodeAgent.Generate`` itself (round robin
  over the agent addresses), exactly as the coordinator does (first message
  ``AgentRequest(generate=..., attempt=1)``);
* **coordinator**: the load generator calls ``Coordinator.Generate``, which picks a node and
  relays the agent's stream.

For each request it records the time to first token (first response carrying a token id) and
the end-to-end latency (stream finished), at concurrency 1 and 64; the difference between the
two paths is the coordinator's overhead. A second cluster whose agents have no simulated latency
gives the tokens/s ceiling of the stack on this machine. The CPU time of every process is read
from /proc around each phase. Results are printed and written to docs/benchmarks.md.

The load generator is this process: one asyncio event loop, one grpc.aio channel per target,
a semaphore per phase for the concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from omni_rpc import config
from omni_rpc.launchers.local import LaunchError, LocalCluster
from omni_rpc.sdk.client import CoordinatorClient
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    node_agent_pb2,
    node_agent_pb2_grpc,
)

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "benchmarks.md"

NUM_NODES = 3
MAX_TOKENS = 64
HEALTHY_TIMEOUT_S = 30.0
WARMUP_REQUESTS = 12
WARMUP_CONCURRENCY = 4
# Every request must finish within this; a stuck stream fails the request, not the bench.
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    ttft_ms: float
    itl_ms: float
    levels: tuple[Level, ...]

    def agent_args(self) -> list[str]:
        return [
            "--sim-ttft-ms", str(self.ttft_ms),
            "--sim-itl-ms", str(self.itl_ms),
            # No slow-down with load: the engine's time is the same on both paths, so any
            # difference is the coordinator's.
            "--sim-itl-growth", "0",
            # Far above the per-node load of concurrency 64: nothing queues in the engine.
            "--sim-max-concurrency", "256",
        ]  # fmt: skip


SCENARIOS = (
    Scenario(
        name="latency",
        description="simulated ttft 20 ms, itl 5 ms (engine time ~335 ms per request)",
        ttft_ms=20.0,
        itl_ms=5.0,
        levels=(Level(1, 50), Level(64, 640)),
    ),
    Scenario(
        name="ceiling",
        description="simulated ttft 0 ms, itl 0 ms (the stack's own cost only)",
        ttft_ms=0.0,
        itl_ms=0.0,
        levels=(Level(1, 200), Level(64, 2000)),
    ),
)


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    e2e_s: float
    tokens: int
    messages: int


@dataclass
class Phase:
    scenario: str
    path: str  # "direct" or "coordinator"
    concurrency: int
    requests: int
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    # CPU seconds used during the phase, by process group.
    cpu_s: dict[str, float] = field(default_factory=dict)

    def ttft(self) -> list[float]:
        return [s.ttft_s for s in self.samples]

    def e2e(self) -> list[float]:
        return [s.e2e_s for s in self.samples]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


# --- statistics and formatting -----------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000.0:.2f}"


def signed_ms(seconds: float) -> str:
    return f"{seconds * 1000.0:+.2f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, padded so it also reads well on a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# --- CPU accounting ----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0.0 where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_cpu_s() -> float:
    """CPU seconds all processes of the machine spent busy (not idle or waiting on I/O)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _CLOCK_TICKS


OWN_PROCESSES = ("coordinator", "agents", "bench")


def cpu_snapshot(cluster: LocalCluster) -> dict[str, float]:
    """CPU seconds used so far by each of our process groups, and by the whole machine."""
    own = os.times()
    return {
        "machine": machine_busy_cpu_s(),
        "coordinator": process_cpu_s(cluster.coordinator.process.pid)
        if cluster.coordinator is not None
        else 0.0,
        "agents": sum(process_cpu_s(a.process.pid) for a in cluster.agents),
        "bench": own.user + own.system,
    }


# --- the cluster -------------------------------------------------------------------------------


def start_cluster(scenario: Scenario) -> tuple[LocalCluster, list[str]]:
    """Start a cluster and wait until its nodes are healthy; return it and the agent addresses.

    If the nodes do not become healthy the cluster is stopped here before the error propagates.
    """
    cluster = LocalCluster(
        num_nodes=NUM_NODES,
        agent_args=scenario.agent_args(),
        log_dir=Path(tempfile.mkdtemp(prefix="omni-bench-")),
    )
    try:
        address = cluster.start()
        client = CoordinatorClient(address, timeout_s=2.0)
        try:
            addresses = wait_healthy(cluster, client)
        finally:
            client.close()
    except BaseException:
        cluster.stop()
        raise
    return cluster, addresses


def wait_healthy(cluster: LocalCluster, client: CoordinatorClient) -> list[str]:
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while True:
        cluster.check_alive()
        try:
            nodes = client.nodes()
        except ConnectionError:
            nodes = []
        healthy = [n for n in nodes if n.state == coordinator_pb2.NODE_STATE_HEALTHY]
        if len(healthy) >= NUM_NODES:
            return [n.address for n in sorted(healthy, key=lambda n: n.node_id)]
        if time.monotonic() > deadline:
            states = ", ".join(f"{n.node_id}={n.state}" for n in nodes) or "none registered"
            raise LaunchError(
                f"{NUM_NODES} nodes not healthy within {HEALTHY_TIMEOUT_S:.0f}s ({states}); "
                f"logs in {cluster.log_dir}"
            )
        time.sleep(0.05)


# --- one request on each path ------------------------------------------------------------------

Target = Callable[[generate_pb2.GenerateRequest], Awaitable[Sample]]


def direct_target(stub: node_agent_pb2_grpc.NodeAgentAsyncStub) -> Target:
    async def call(request: generate_pb2.GenerateRequest) -> Sample:
        start = time.perf_counter()
        stream = stub.Generate(None, timeout=REQUEST_TIMEOUT_S)
        finished = False
        try:
            await stream.write(node_agent_pb2.AgentRequest(generate=request, attempt=1))
            sample = await _consume(stream, start)
            finished = True
        finally:
            if not finished:
                stream.cancel()
        return sample

    return call


def coordinator_target(stub: coordinator_pb2_grpc.CoordinatorAsyncStub) -> Target:
    async def call(request: generate_pb2.GenerateRequest) -> Sample:
        start = time.perf_counter()
        stream = stub.Generate(request, timeout=REQUEST_TIMEOUT_S)
        finished = False
        try:
            sample = await _consume(stream, start)
            finished = True
        finally:
            if not finished:
                stream.cancel()
        return sample

    return call


async def _consume(
    stream: grpc.aio.UnaryStreamCall[generate_pb2.GenerateRequest, generate_pb2.GenerateResponse]
    | grpc.aio.StreamStreamCall[node_agent_pb2.AgentRequest, generate_pb2.GenerateResponse],
    start: float,
) -> Sample:
    first: float | None = None
    tokens = messages = 0
    finish_reason = ""
    async for response in stream:
        messages += 1
        if response.token_ids:
            if first is None:
                first = time.perf_counter()
            tokens += len(response.token_ids)
        if response.finish_reason:
            finish_reason = response.finish_reason
    end = time.perf_counter()
    if finish_reason != "length" or tokens != MAX_TOKENS:
        raise RuntimeError(f"unexpected end: finish_reason={finish_reason!r} tokens={tokens}")
    assert first is not None
    return Sample(first - start, end - start, tokens, messages)


# --- phases ------------------------------------------------------------------------------------


def make_requests(tag: str, count: int) -> list[generate_pb2.GenerateRequest]:
    """The workload: the same prompts and sampling for both paths (only the ids differ)."""
    return [
        generate_pb2.GenerateRequest(
            request_id=f"bench-{tag}-{i}",
            prompt=f"benchmark prompt {i % 32}: explain distributed inference over gRPC",
            sampling=generate_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=i % 32),
        )
        for i in range(count)
    ]


async def run_phase(
    phase: Phase, targets: Sequence[Target], cluster: LocalCluster, *, record: bool = True
) -> None:
    requests = make_requests(f"{phase.scenario}-{phase.path}-c{phase.concurrency}", phase.requests)
    slots = asyncio.Semaphore(phase.concurrency)

    async def one(index: int, request: generate_pb2.GenerateRequest) -> None:
        async with slots:
            try:
                sample = await targets[index % len(targets)](request)
            except grpc.aio.AioRpcError as exc:
                phase.errors.append(f"{exc.code().name}: {exc.details()}"[:300])
                return
            except RuntimeError as exc:
                phase.errors.append(str(exc)[:300])
                return
            phase.samples.append(sample)

    before = cpu_snapshot(cluster)
    start = time.perf_counter()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    phase.wall_s = time.perf_counter() - start
    after = cpu_snapshot(cluster)
    phase.cpu_s = {k: after[k] - before[k] for k in before}
    if record:
        print(f"  {describe(phase)}", flush=True)


def describe(phase: Phase) -> str:
    return (
        f"{phase.scenario:<8} c={phase.concurrency:<3} {phase.path:<11} "
        f"n={len(phase.samples):<4} err={len(phase.errors):<2} "
        f"ttft p50={ms(percentile(phase.ttft(), 50))} ms p99={ms(percentile(phase.ttft(), 99))} ms "
        f"e2e p50={ms(percentile(phase.e2e(), 50))} ms p99={ms(percentile(phase.e2e(), 99))} ms "
        f"{phase.tokens_per_s:.0f} tok/s in {phase.wall_s:.1f}s"
    )


async def run_scenario(scenario: Scenario) -> list[Phase]:
    print(f"scenario {scenario.name}: {scenario.description}", flush=True)
    # Started from the loop's own thread, on purpose: the launcher ties each child's life to
    # the thread that spawned it (PR_SET_PDEATHSIG), so a worker thread must not spawn them.
    # Blocking the loop here is harmless: nothing is in flight between phases.
    cluster, agent_addresses = start_cluster(scenario)
    channels: list[grpc.aio.Channel] = []
    ok = False
    try:
        options = config.GRPC_MESSAGE_OPTIONS
        for address in agent_addresses:
            channels.append(grpc.aio.insecure_channel(address, options=options))
        channels.append(grpc.aio.insecure_channel(cluster.coordinator_address, options=options))
        paths: dict[str, list[Target]] = {
            "direct": [direct_target(node_agent_pb2_grpc.NodeAgentStub(c)) for c in channels[:-1]],
            "coordinator": [coordinator_target(coordinator_pb2_grpc.CoordinatorStub(channels[-1]))],
        }
        # Connect every channel and warm both paths (and the agents) before measuring.
        for path, targets in paths.items():
            warm = Phase(scenario.name, path, WARMUP_CONCURRENCY, WARMUP_REQUESTS)
            await run_phase(warm, targets, cluster, record=False)
            if warm.errors:
                raise RuntimeError(f"warm-up of {path} failed: {warm.errors[0]}")
        phases = []
        for level in scenario.levels:
            for path, targets in paths.items():
                phase = Phase(scenario.name, path, level.concurrency, level.requests)
                await run_phase(phase, targets, cluster)
                phases.append(phase)
        cluster.check_alive()
        ok = True
        return phases
    finally:
        for channel in channels:
            await channel.close(None)
        cluster.stop()
        if ok:
            shutil.rmtree(cluster.log_dir or "", ignore_errors=True)
        else:
            print(f"cluster logs kept in {cluster.log_dir}", file=sys.stderr)


async def run_all(scenarios: Sequence[Scenario]) -> list[Phase]:
    phases: list[Phase] = []
    for scenario in scenarios:
        phases += await run_scenario(scenario)
    return phases


# --- the report --------------------------------------------------------------------------------


def pairs(phases: Sequence[Phase]) -> list[tuple[Phase, Phase]]:
    """(direct, coordinator) for each scenario and concurrency, in run order."""
    by_key = {(p.scenario, p.concurrency, p.path): p for p in phases}
    out = []
    for p in phases:
        if p.path == "direct":
            out.append((p, by_key[(p.scenario, p.concurrency, "coordinator")]))
    return out


def latency_table(phases: Sequence[Phase]) -> str:
    headers = [
        "scenario", "conc.", "path", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms",
        "E2E p50 ms", "E2E p99 ms", "tokens/s", "msgs/request", "wall s",
    ]  # fmt: skip
    rows = [
        [
            p.scenario,
            str(p.concurrency),
            p.path,
            str(len(p.samples)),
            str(len(p.errors)),
            ms(percentile(p.ttft(), 50)),
            ms(percentile(p.ttft(), 99)),
            ms(percentile(p.e2e(), 50)),
            ms(percentile(p.e2e(), 99)),
            f"{p.tokens_per_s:.0f}",
            f"{p.messages / max(1, len(p.samples)):.1f}",
            f"{p.wall_s:.2f}",
        ]
        for p in phases
    ]
    return render_table(headers, rows)


def added_table(phases: Sequence[Phase]) -> str:
    headers = [
        "scenario", "conc.", "added TTFT p50 ms", "added TTFT p99 ms", "added E2E p50 ms",
        "added E2E p99 ms", "tokens/s direct", "tokens/s coordinator",
    ]  # fmt: skip
    rows = []
    for d, c in pairs(phases):
        rows.append(
            [
                d.scenario,
                str(d.concurrency),
                signed_ms(percentile(c.ttft(), 50) - percentile(d.ttft(), 50)),
                signed_ms(percentile(c.ttft(), 99) - percentile(d.ttft(), 99)),
                signed_ms(percentile(c.e2e(), 50) - percentile(d.e2e(), 50)),
                signed_ms(percentile(c.e2e(), 99) - percentile(d.e2e(), 99)),
                f"{d.tokens_per_s:.0f}",
                f"{c.tokens_per_s:.0f}",
            ]
        )
    return render_table(headers, rows)


def cpu_table(phases: Sequence[Phase]) -> str:
    headers = [
        "scenario", "conc.", "path", "coordinator CPU s", "agents CPU s", "bench CPU s",
        "coordinator CPU ms/request", "coordinator CPU us/message", "bench processes CPU %",
        "other CPU %",
    ]  # fmt: skip
    cores = os.cpu_count() or 1
    rows = []
    for p in phases:
        coord = p.cpu_s.get("coordinator", 0.0)
        own = sum(p.cpu_s.get(k, 0.0) for k in OWN_PROCESSES)
        other = max(0.0, p.cpu_s.get("machine", 0.0) - own)
        capacity = p.wall_s * cores
        per_request = coord / max(1, len(p.samples)) if p.path == "coordinator" else 0.0
        per_message = coord / max(1, p.messages) if p.path == "coordinator" else 0.0
        rows.append(
            [
                p.scenario,
                str(p.concurrency),
                p.path,
                f"{coord:.2f}",
                f"{p.cpu_s.get('agents', 0.0):.2f}",
                f"{p.cpu_s.get('bench', 0.0):.2f}",
                ms(per_request) if p.path == "coordinator" else "-",
                f"{per_message * 1e6:.1f}" if p.path == "coordinator" else "-",
                f"{100.0 * own / capacity:.0f}" if capacity else "-",
                f"{100.0 * other / capacity:.0f}" if capacity else "-",
            ]
        )
    return render_table(headers, rows)


def interpretation(phases: Sequence[Phase]) -> list[str]:
    cores = os.cpu_count() or 1
    lines = []
    for d, c in pairs(phases):
        added_ttft = percentile(c.ttft(), 50) - percentile(d.ttft(), 50)
        added_e2e = percentile(c.e2e(), 50) - percentile(d.e2e(), 50)
        added_e2e99 = percentile(c.e2e(), 99) - percentile(d.e2e(), 99)
        coord_cpu = c.cpu_s.get("coordinator", 0.0)
        own = sum(c.cpu_s.get(k, 0.0) for k in OWN_PROCESSES)
        busy = own / (c.wall_s * cores) if c.wall_s else 0.0
        text = (
            f"- **{d.scenario}, concurrency {d.concurrency}**: the coordinator adds "
            f"{signed_ms(added_ttft)} ms to the median time to first token and "
            f"{signed_ms(added_e2e)} ms to the median end-to-end latency "
            f"({signed_ms(added_e2e99)} ms at p99); throughput {c.tokens_per_s:.0f} tokens/s "
            f"through it against {d.tokens_per_s:.0f} tokens/s direct. The coordinator "
            f"process used {coord_cpu:.2f} CPU s ({100.0 * coord_cpu / c.wall_s:.0f}% of one "
            f"core; {1000.0 * coord_cpu / max(1, len(c.samples)):.2f} ms per request, "
            f"{1e6 * coord_cpu / max(1, c.messages):.1f} us per relayed message), and all "
            f"processes together kept the {cores} core(s) {100.0 * busy:.0f}% busy."
        )
        lines.append(text)
    lines += [
        "",
        "Reading the numbers: in `latency` at concurrency 1 the machine is nearly idle, so "
        "the difference is the price of the extra hop (one more gRPC stream, one more "
        "serialisation of every message, the coordinator's dispatch bookkeeping); in `ceiling` "
        "at concurrency 1 nothing waits on the engine, so the same hop cost is seen without "
        "the engine's time around it. At concurrency 64 every "
        "process (load generator, coordinator, three agents) competes for the same cores, so "
        "the added latency there mostly measures CPU contention: the coordinator's CPU per "
        "relayed message is the figure that carries over to a real deployment, where agents "
        "run on their own GPU hosts. The simulated engine sends one message per token when "
        "it is not slowed down by a busy consumer (the agent coalesces tokens that are ready "
        "together), so messages/request near 64 means per-token streaming; fewer means the "
        "consumers fell behind and tokens were batched. The `ceiling` rows have no simulated "
        "latency at all: their tokens/s is what this machine's Python gRPC stack can move, "
        "direct and through the coordinator.",
    ]
    return lines


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine_lines() -> str:
    return (
        f"- CPU cores (`os.cpu_count()`): {os.cpu_count()}\n"
        f"- Python {platform.python_version()} ({platform.python_implementation()}), "
        f"grpcio {grpc.__version__}\n"
        f"- Platform: {platform.platform()}"
    )


def sim_section(
    scenarios: Sequence[Scenario],
    phases: Sequence[Phase],
    duration_s: float,
    load_before: str,
    when: str,
) -> str:
    """The Markdown section of docs/benchmarks.md for the simulated cluster."""
    scenario_list = "\n".join(
        f"- `{s.name}`: {s.description}; "
        + ", ".join(f"concurrency {lv.concurrency} x {lv.requests} requests" for lv in s.levels)
        for s in scenarios
    )
    errors = [
        f"- {p.scenario} c={p.concurrency} {p.path}: {e}" for p in phases for e in p.errors[:3]
    ]
    text = f"""## Coordinator overhead (simulated engines)

### What is measured

A local cluster (one coordinator, {NUM_NODES} simulated agents, all separate processes on this
machine) serves the same workload two ways:

- **direct**: the load generator calls `NodeAgent.Generate` on the agents itself, round robin
  over their addresses, the way the coordinator calls them;
- **coordinator**: the load generator calls `Coordinator.Generate` (round-robin strategy), which
  relays each agent stream.

Every request asks for {MAX_TOKENS} tokens (`max_tokens={MAX_TOKENS}`, 32 distinct prompts and
seeds). Per request we record the **time to first token** (TTFT: until the first response
carrying a token) and the **end-to-end latency** (E2E: until the stream ends), and report p50
and p99 (linear interpolation). **Added** latency is coordinator minus direct, per percentile.
Tokens/s is tokens received divided by the wall time of the phase. Agents run with
`--sim-itl-growth 0` (no slow-down with load, so the engine's time is identical on both paths)
and `--sim-max-concurrency 256` (nothing queues). Each path is warmed up with
{WARMUP_REQUESTS} requests before measuring. CPU seconds come from `/proc/PID/stat` of each
process around each phase; percentages are of all cores over the phase's wall time, and
"other CPU" is what the rest of the machine used meanwhile (`/proc/stat` minus our processes):
when it is not near 0 the numbers were disturbed.

Scenarios:

{scenario_list}

The load generator is one asyncio event loop in the bench process with one grpc.aio channel per
target (three agents, one coordinator) and a semaphore holding the concurrency.

- Date: {when}; this part took {duration_s:.1f} s.
- Load average before this part (1/5/15 min): {load_before}; other work on the machine skews
  the concurrency-64 rows most.

### Latency and throughput

{latency_table(phases)}

### What the coordinator adds

{added_table(phases)}

### CPU

{cpu_table(phases)}

### Interpretation

{chr(10).join(interpretation(phases))}
"""
    if errors:
        text += "\n### Errors\n\n" + "\n".join(errors) + "\n"
    return text


SECTIONS = ("sim", "vllm")
# Written by scripts/bench_peers.py (`make bench-peers`), scripts/bench_ha.py (`make
# bench-ha`) and scripts/bench_cache.py (`make bench-cache`); this script only keeps them.
PEERS_SECTION = "peers"
HA_SECTION = "ha"
CACHE_SECTION = "cache"


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def kept_section(path: Path, name: str) -> str | None:
    """Section ``name`` of the existing report, for a run that did not redo it."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = _markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def write_doc(path: Path, sections: dict[str, str], duration_s: float) -> None:
    """Write the report; a section this run did not produce is kept from the existing file."""
    parts = []
    for name in SECTIONS:
        body = sections.get(name) or kept_section(path, name)
        if body is None:
            body = f"_Not run yet: `.venv/bin/python scripts/bench.py --only {name}`._\n"
        start, end = _markers(name)
        parts.append(f"{start}\n{body.rstrip()}\n{end}")
    ran = " and ".join(f"`{n}`" for n in SECTIONS if n in sections)
    # `make bench-peers`, `make bench-ha` and `make bench-cache` own sections of their own
    # (scripts/bench_peers.py, scripts/bench_ha.py, scripts/bench_cache.py): kept as they are.
    for owned in (PEERS_SECTION, HA_SECTION, CACHE_SECTION):
        kept = kept_section(path, owned)
        if kept is not None:
            start, end = _markers(owned)
            parts.append(f"{start}\n{kept.rstrip()}\n{end}")
    joined = "\n\n".join(parts)
    text = f"""# Benchmarks

Generated by `make bench` (`.venv/bin/python scripts/bench.py`); rerun it to refresh this page.
`scripts/bench.py --only sim` or `--only vllm` reruns one section and keeps the other.

- **Coordinator overhead**: a local cluster of simulated agents, called directly and through
  the coordinator.
- **Agent overhead**: the same vLLM engine called in-process and through one node agent over
  gRPC.

## Machine

{machine_lines()}
- Last run: {ran} section(s), {duration_s:.1f} s in all.

{joined}
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="Markdown report to write")
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        help="run one section (sim: coordinator overhead; vllm: agent overhead); default both",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the sim section's request counts (e.g. 0.2 for a quick smoke run)",
    )
    parser.add_argument(
        "--vllm-reps",
        type=int,
        default=3,
        help="repetitions of each side in the vllm section (the median is reported)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sections: dict[str, str] = {}
    failed = 0
    if args.only in (None, "sim"):
        phases, text = run_sim(args.scale)
        if phases is None:
            return 1
        sections["sim"] = text
        failed += sum(len(p.errors) for p in phases)
    if args.only in (None, "vllm"):
        # Imported here: the sim section alone needs neither vLLM nor torch.
        import bench_vllm

        print(
            f"\nomni-rpc bench: agent overhead, vLLM {bench_vllm.MODEL} in-process vs one agent, "
            f"{args.vllm_reps} repetitions",
            flush=True,
        )
        try:
            result = asyncio.run(bench_vllm.run(reps=args.vllm_reps))
        except (LaunchError, RuntimeError) as exc:
            print(f"bench: vllm section failed: {exc}", file=sys.stderr)
            return 1
        print()
        print(bench_vllm.summary_table(result))
        added_cpu, implied = bench_vllm.cpu_estimate(result)
        print(f"\n{bench_vllm.verdict(result)}")
        print(
            f"agent path CPU: {added_cpu * 1e6:+.0f} us per token over in-process, "
            f"implying a ratio of {implied:.3f} on this machine"
        )
        sections["vllm"] = bench_vllm.section(result, now_utc())
        failed += len(result.errors)
    duration = time.perf_counter() - started
    write_doc(args.out, sections, duration)
    print(f"\nwrote {args.out} ({duration:.1f} s)")
    if failed:
        print(f"bench: {failed} request(s) failed", file=sys.stderr)
        return 1
    return 0


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def run_sim(scale: float) -> tuple[list[Phase] | None, str]:
    """The coordinator-overhead section: (phases, Markdown), or (None, "") if it failed."""
    scenarios = [
        Scenario(
            s.name,
            s.description,
            s.ttft_ms,
            s.itl_ms,
            tuple(
                Level(lv.concurrency, max(lv.concurrency, round(lv.requests * scale)))
                for lv in s.levels
            ),
        )
        for s in SCENARIOS
    ]
    print(
        f"omni-rpc bench: coordinator overhead, {NUM_NODES} simulated agents, "
        f"max_tokens={MAX_TOKENS}, {os.cpu_count()} cores, Python {platform.python_version()}",
        flush=True,
    )
    load_before = load_average()
    print(f"load average before the run: {load_before}", flush=True)
    started = time.perf_counter()
    try:
        phases = asyncio.run(run_all(scenarios))
    except (LaunchError, RuntimeError) as exc:
        print(f"bench: sim section failed: {exc}", file=sys.stderr)
        return None, ""
    duration = time.perf_counter() - started
    print()
    print(latency_table(phases))
    print()
    print(added_table(phases))
    print()
    print(cpu_table(phases))
    return phases, sim_section(scenarios, phases, duration, load_before, now_utc())


if __name__ == "__main__":
    sys.exit(main())
