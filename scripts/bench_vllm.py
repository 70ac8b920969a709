"""Agent overhead: the same vLLM engine called in-process and through one node agent over gRPC.

Part of ``make bench`` (``scripts/bench.py``, or ``scripts/bench.py --only vllm`` alone). Two
engines with the same settings (``VllmConfig`` -> ``engine_args``, exactly what
``python -m node_agent --engine vllm`` builds) are started side by side:

* **in-process**: ``AsyncLLM.from_engine_args(...)`` in this process; the load generator calls
  ``AsyncLLM.generate`` directly (``output_kind=DELTA``), so this process runs vLLM's front end
  (tokenizer, output processor, detokenizer) and vLLM's engine-core and worker processes do
  the model;
* **agent**: one ``python -m node_agent --engine vllm`` process (standalone: its coordinator
  address points at a closed port, so it keeps retrying to join in the background, which
  costs nothing measurable); the load generator reaches it the way a coordinator does: every
  request on one multiplexed ``NodeAgent.Session``, through the coordinator's own session
  client (``coordinator.session.AgentSession``), so outputs of one engine step travel together.
  The agent process runs vLLM's front end plus the gRPC server.

Both see the same workloads (same prompts, greedy, ``ignore_eos`` so every request makes
exactly ``max_tokens`` tokens): a batch of 16 concurrent requests (throughput) and a few
sequential ones (time to first token without batching). Each side is warmed up, then the
sides alternate for several repetitions (in-process first on even repetitions, agent first
on odd ones) so that drift in the machine's load hits both alike; the report gives the median
over repetitions. The idle engine of the other side stays up meanwhile (its CPU use is
measured and reported; an idle vLLM engine blocks on its input queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from bench import (
    Sample,
    load_average,
    machine_busy_cpu_s,
    ms,
    percentile,
    process_cpu_s,
    render_table,
    signed_ms,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.session import AgentSession
from node_agent.engines.vllm import VllmConfig, engine_args
from node_agent.models import resolve as resolve_model
from omni_rpc import config
from omni_rpc.launchers.local import Child, LaunchError, LocalCluster
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_agent_pb2_grpc

MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 256
DTYPE = "float32"
MAX_NUM_SEQS = 16
# The agent's flags for the settings above (node_agent/main.py turns them into the same
# VllmConfig as vllm_config() below).
AGENT_ARGS = (
    "--max-model-len", str(MAX_MODEL_LEN),
    "--dtype", DTYPE,
    "--max-num-seqs", str(MAX_NUM_SEQS),
)  # fmt: skip
STARTUP_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 300.0
DEFAULT_REPS = 3
# Throughput acceptance: agent tokens/s at least this share of in-process vLLM's.
TARGET_RATIO = 0.95


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    concurrency: int
    requests: int
    max_tokens: int


BATCH = Workload("batch", "16 requests at once (one full batch)", MAX_NUM_SEQS, MAX_NUM_SEQS, 64)
SINGLE = Workload("single", "6 requests one after another", 1, 6, 8)
WORKLOADS = (BATCH, SINGLE)
# Warm-up per side: compiles nothing on CPU (enforce_eager) but fills the prefix cache, the
# tokenizer's caches and the gRPC channel.
WARMUP = (
    Workload("warm-batch", "", MAX_NUM_SEQS, MAX_NUM_SEQS, 8),
    Workload("warm-1", "", 1, 2, 4),
)
SIDES = ("in-process", "agent")


def prompt(index: int) -> str:
    """The workload's prompts: 16 distinct ones of nearly the same length."""
    topics = (
        "load balancing", "failover", "streaming", "backpressure", "health checks",
        "retries", "deadlines", "cancellation", "prefix caching", "batching",
        "tokenization", "sampling", "KV cache", "scheduling", "quantization", "tracing",
    )  # fmt: skip
    return (
        f"Question {index}: in two paragraphs, explain {topics[index % len(topics)]} "
        "in a distributed inference service that streams tokens over gRPC."
    )


def vllm_config() -> VllmConfig:
    """What node_agent/main.py builds from ``--engine vllm --model MODEL`` and AGENT_ARGS."""
    return VllmConfig(
        model=resolve_model(MODEL),
        served_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=MAX_NUM_SEQS,
        dtype=DTYPE,
    )


# --- process accounting ------------------------------------------------------------------------


def children_by_parent() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(pid: int, tree: dict[int, list[int]], skip: int = -1) -> list[int]:
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        if child == skip:
            continue
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


GROUPS = ("bench", "agent", "agent engine", "in-process engine")


@dataclass
class Processes:
    """The pids whose CPU time is read around each run."""

    agent_pid: int

    def snapshot(self) -> dict[str, float]:
        tree = children_by_parent()
        own = os.times()
        me = os.getpid()
        return {
            "machine": machine_busy_cpu_s(),
            "bench": own.user + own.system,
            "agent": process_cpu_s(self.agent_pid),
            "agent engine": sum(process_cpu_s(p) for p in descendants(self.agent_pid, tree)),
            "in-process engine": sum(
                process_cpu_s(p) for p in descendants(me, tree, skip=self.agent_pid)
            ),
        }


# --- one request on each side ------------------------------------------------------------------

Call = Callable[[int, str, int], Awaitable[Sample]]


class UnexpectedEnd(RuntimeError):
    pass


def check_end(finish_reason: str | None, tokens: int, max_tokens: int) -> None:
    if finish_reason != "length" or tokens != max_tokens:
        raise UnexpectedEnd(f"unexpected end: finish_reason={finish_reason!r} tokens={tokens}")


def in_process_call(llm: Any) -> Call:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def call(index: int, request_id: str, max_tokens: int) -> Sample:
        # What VllmEngine._sampling_params makes of the agent side's request.
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        start = time.perf_counter()
        first: float | None = None
        tokens = messages = 0
        finish_reason: str | None = None
        async for output in llm.generate(prompt(index), params, request_id):
            messages += 1
            piece = output.outputs[0]
            if piece.token_ids:
                if first is None:
                    first = time.perf_counter()
                tokens += len(piece.token_ids)
            if output.finished:
                finish_reason = piece.finish_reason
        end = time.perf_counter()
        check_end(finish_reason, tokens, max_tokens)
        assert first is not None
        return Sample(first - start, end - start, tokens, messages)

    return call


def agent_call(stub: node_agent_pb2_grpc.NodeAgentAsyncStub) -> Call:
    # The coordinator's own session client: the path every routed request takes to an agent.
    session = AgentSession(lambda: stub.Session(), "bench")  # type: ignore[call-arg]

    async def call(index: int, request_id: str, max_tokens: int) -> Sample:
        request = generate_pb2.GenerateRequest(
            request_id=request_id,
            prompt=prompt(index),
            sampling=generate_pb2.SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ),
        )
        start = time.perf_counter()
        attempt = session.start(
            node_agent_pb2.AgentRequest(generate=request, attempt=1), REQUEST_TIMEOUT_S
        )
        finished = False
        first: float | None = None
        tokens = messages = 0
        finish_reason = ""
        try:
            async for response in attempt:
                messages += 1
                if response.token_ids:
                    if first is None:
                        first = time.perf_counter()
                    tokens += len(response.token_ids)
                if response.finish_reason:
                    finish_reason = response.finish_reason
            finished = True
        finally:
            if not finished:
                attempt.cancel()
        end = time.perf_counter()
        check_end(finish_reason, tokens, max_tokens)
        assert first is not None
        return Sample(first - start, end - start, tokens, messages)

    return call


# --- runs --------------------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    workload: Workload
    rep: int
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft_p50(self) -> float:
        return percentile([s.ttft_s for s in self.samples], 50)

    def describe(self) -> str:
        ttft = [s.ttft_s for s in self.samples]
        e2e = [s.e2e_s for s in self.samples]
        return (
            f"{self.workload.name:<6} rep {self.rep} {self.side:<10} n={len(self.samples):<2} "
            f"err={len(self.errors)} ttft p50={ms(percentile(ttft, 50))} ms "
            f"e2e p50={ms(percentile(e2e, 50))} ms {self.tokens_per_s:.1f} tok/s "
            f"in {self.wall_s:.2f}s"
        )


async def run_workload(
    side: str, workload: Workload, rep: int, call: Call, processes: Processes
) -> Run:
    run = Run(side, workload, rep)
    slots = asyncio.Semaphore(workload.concurrency)
    tag = f"{side}-{workload.name}-r{rep}"

    async def one(index: int) -> None:
        async with slots:
            try:
                sample = await call(index, f"bench-{tag}-{index}", workload.max_tokens)
            except grpc.aio.AioRpcError as exc:
                run.errors.append(f"{exc.code().name}: {exc.details()}"[:300])
                return
            except Exception as exc:  # a vLLM failure on the in-process side
                run.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                return
            run.samples.append(sample)

    before = processes.snapshot()
    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(workload.requests)))
    run.wall_s = time.perf_counter() - start
    after = processes.snapshot()
    run.cpu_s = {k: after[k] - before[k] for k in before}
    return run


@dataclass
class VllmResult:
    runs: list[Run]
    reps: int
    startup_s: float
    duration_s: float
    load_before: str
    log_dir: Path

    def measured(self, side: str, workload: Workload) -> list[Run]:
        return [r for r in self.runs if r.side == side and r.workload == workload]

    def median_tokens_per_s(self, side: str, workload: Workload) -> float:
        runs = self.measured(side, workload)
        return statistics.median(r.tokens_per_s for r in runs) if runs else float("nan")

    def median_ttft(self, side: str, workload: Workload) -> float:
        runs = self.measured(side, workload)
        return statistics.median(r.ttft_p50() for r in runs) if runs else float("nan")

    def ratio(self, workload: Workload = BATCH) -> float:
        base = self.median_tokens_per_s("in-process", workload)
        return self.median_tokens_per_s("agent", workload) / base if base > 0 else float("nan")

    @property
    def errors(self) -> list[str]:
        return [f"{r.side} {r.workload.name} rep {r.rep}: {e}" for r in self.runs for e in r.errors]


# --- output ------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[TextIO]:
    """Send this process's stdout and stderr (and so those of the vLLM processes it starts) to
    ``log_path``; yield a stream to the original stdout for progress lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_out), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        console.close()


def closed_port() -> int:
    """A local port nothing listens on (the agent's coordinator: it keeps retrying to join)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def read_port(port_file: Path) -> int | None:
    try:
        return int(port_file.read_text())
    except (OSError, ValueError):  # not written yet
        return None


async def wait_serving(child: Child, port_file: Path, deadline: float) -> str:
    """The agent's address once its port file exists and its health says SERVING."""
    while (port := read_port(port_file)) is None:
        if not child.alive:
            raise LaunchError(
                f"agent exited with code {child.process.returncode} while starting:\n"
                + child.log_tail()
            )
        if time.monotonic() > deadline:
            raise LaunchError("agent did not start in time:\n" + child.log_tail())
        await asyncio.sleep(0.2)
    address = f"127.0.0.1:{port}"
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=config.NODE_AGENT_SERVICE), timeout=2.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return address
            except grpc.aio.AioRpcError:
                pass
            if not child.alive or time.monotonic() > deadline:
                raise LaunchError("agent never became SERVING:\n" + child.log_tail())
            await asyncio.sleep(0.2)


async def measure(
    llm: Any, stub: node_agent_pb2_grpc.NodeAgentAsyncStub, processes: Processes, reps: int,
    say: Callable[[str], None],
) -> list[Run]:  # fmt: skip
    calls = {"in-process": in_process_call(llm), "agent": agent_call(stub)}
    for side in SIDES:
        for workload in WARMUP:
            warm = await run_workload(side, workload, 0, calls[side], processes)
            if warm.errors:
                raise RuntimeError(f"warm-up of {side} failed: {warm.errors[0]}")
    say("  warmed up both sides")
    runs: list[Run] = []
    for rep in range(1, reps + 1):
        order = SIDES if rep % 2 == 1 else tuple(reversed(SIDES))
        for workload in WORKLOADS:
            for side in order:
                run = await run_workload(side, workload, rep, calls[side], processes)
                runs.append(run)
                say(f"  {run.describe()}")
    return runs


async def run(reps: int = DEFAULT_REPS, say: Callable[[str], None] | None = None) -> VllmResult:
    """Start both engines, measure, stop them. vLLM's output goes to a log folder."""
    log_dir = Path(tempfile.mkdtemp(prefix="omni-bench-vllm-"))
    load_before = load_average()
    started = time.perf_counter()
    cfg = vllm_config()  # prepares the model folder once if needed
    cluster = LocalCluster(
        num_nodes=1,
        engine="vllm",
        model=MODEL,
        agent_args=AGENT_ARGS,
        log_dir=log_dir,
        coordinator_address=f"127.0.0.1:{closed_port()}",
    )
    port_file = log_dir / "agent.port"
    llm: Any = None
    ok = False
    startup_s = 0.0
    runs: list[Run] = []
    with output_to(log_dir / "in-process.log") as console:

        def progress(line: str) -> None:
            print(line, file=console, flush=True)
            if say is not None:
                say(line)

        progress(f"vLLM and agent logs in {log_dir} (removed if all goes well)")
        try:
            # The agent loads its engine in its own processes while this one loads in-process.
            child = cluster.start_agent(0, extra=["--port-file", str(port_file)])
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(cfg)))
            progress(f"  in-process engine up after {time.perf_counter() - started:.1f}s")
            address = await wait_serving(child, port_file, time.monotonic() + STARTUP_TIMEOUT_S)
            startup_s = time.perf_counter() - started
            progress(f"  agent SERVING at {address} after {startup_s:.1f}s")
            processes = Processes(child.process.pid)
            async with grpc.aio.insecure_channel(
                address, options=config.GRPC_MESSAGE_OPTIONS
            ) as channel:
                stub = node_agent_pb2_grpc.NodeAgentStub(channel)
                runs = await measure(llm, stub, processes, reps, progress)
            cluster.check_alive()
            ok = True
        finally:
            cluster.stop()
            if llm is not None:
                llm.shutdown()
                del llm
                gc.collect()
            if not ok:
                progress(f"vLLM bench failed; logs kept in {log_dir}")
    if ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    return VllmResult(runs, reps, startup_s, time.perf_counter() - started, load_before, log_dir)


# --- the report --------------------------------------------------------------------------------


def runs_table(result: VllmResult) -> str:
    headers = [
        "workload", "rep", "side", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms",
        "E2E p50 ms", "tokens/s", "msgs/request", "wall s", "bench CPU s", "agent CPU s",
        "engine CPU s", "idle engine CPU s", "other CPU s",
    ]  # fmt: skip
    rows = []
    for r in result.runs:
        engine, idle = (
            ("agent engine", "in-process engine")
            if r.side == "agent"
            else ("in-process engine", "agent engine")
        )
        ours = sum(r.cpu_s.get(g, 0.0) for g in GROUPS)
        rows.append(
            [
                r.workload.name,
                str(r.rep),
                r.side,
                str(len(r.samples)),
                str(len(r.errors)),
                ms(r.ttft_p50()),
                ms(percentile([s.ttft_s for s in r.samples], 99)),
                ms(percentile([s.e2e_s for s in r.samples], 50)),
                f"{r.tokens_per_s:.1f}",
                f"{sum(s.messages for s in r.samples) / max(1, len(r.samples)):.1f}",
                f"{r.wall_s:.2f}",
                f"{r.cpu_s.get('bench', 0.0):.2f}",
                f"{r.cpu_s.get('agent', 0.0):.2f}" if r.side == "agent" else "-",
                f"{r.cpu_s.get(engine, 0.0):.2f}",
                f"{r.cpu_s.get(idle, 0.0):.2f}",
                f"{max(0.0, r.cpu_s.get('machine', 0.0) - ours):.2f}",
            ]
        )
    return render_table(headers, rows)


def summary_table(result: VllmResult) -> str:
    headers = [
        "workload", "in-process tokens/s", "agent tokens/s", "ratio agent/in-process",
        "in-process TTFT p50 ms", "agent TTFT p50 ms", "added TTFT ms",
    ]  # fmt: skip
    rows = []
    for w in WORKLOADS:
        base = result.median_tokens_per_s("in-process", w)
        agent = result.median_tokens_per_s("agent", w)
        ttft_base = result.median_ttft("in-process", w)
        ttft_agent = result.median_ttft("agent", w)
        rows.append(
            [
                f"{w.name} (c={w.concurrency}, {w.max_tokens} tokens)",
                f"{base:.1f}",
                f"{agent:.1f}",
                f"{agent / base:.3f}" if base > 0 else "-",
                ms(ttft_base),
                ms(ttft_agent),
                signed_ms(ttft_agent - ttft_base),
            ]
        )
    return render_table(headers, rows)


def cpu_per_token(result: VllmResult, side: str, group: str) -> float:
    runs = result.measured(side, BATCH)
    tokens = sum(r.tokens for r in runs)
    return sum(r.cpu_s.get(group, 0.0) for r in runs) / tokens if tokens else float("nan")


def other_share(result: VllmResult) -> float:
    """Share of the machine's cores used by processes not ours during the measured runs."""
    cores = os.cpu_count() or 1
    wall = sum(r.wall_s for r in result.runs)
    other = sum(
        max(0.0, r.cpu_s.get("machine", 0.0) - sum(r.cpu_s.get(g, 0.0) for g in GROUPS))
        for r in result.runs
    )
    return other / (wall * cores) if wall else 0.0


def verdict(result: VllmResult) -> str:
    ratio = result.ratio()
    met = "meets" if ratio >= TARGET_RATIO else "does NOT meet"
    return (
        f"agent/in-process tokens/s = {ratio:.3f} on the batch workload (median of "
        f"{result.reps} repetitions), which {met} the target of >= {TARGET_RATIO}"
    )


def cpu_estimate(result: VllmResult) -> tuple[float, float]:
    """(CPU seconds per token the agent path adds, the throughput ratio that alone implies).

    On a CPU host every core-second the agent path spends is a core-second the model does not
    get, so with the machine saturated the expected ratio is 1 - added / (cores / tokens/s).
    Unlike the measured ratio this is barely touched by other load on the machine.
    """
    added = (
        cpu_per_token(result, "agent", "agent")
        + cpu_per_token(result, "agent", "bench")
        - cpu_per_token(result, "in-process", "bench")
    )
    per_token_core_s = (os.cpu_count() or 1) / result.median_tokens_per_s("in-process", BATCH)
    return added, 1.0 - added / per_token_core_s


def section(result: VllmResult, when: str) -> str:
    """The Markdown section of docs/benchmarks.md for this part."""
    cores = os.cpu_count() or 1
    front_in = cpu_per_token(result, "in-process", "bench")
    front_agent = cpu_per_token(result, "agent", "agent")
    client_agent = cpu_per_token(result, "agent", "bench")
    engine_in = cpu_per_token(result, "in-process", "in-process engine")
    engine_agent = cpu_per_token(result, "agent", "agent engine")
    added_cpu, implied_ratio = cpu_estimate(result)
    single_added = result.median_ttft("agent", SINGLE) - result.median_ttft("in-process", SINGLE)
    batch_added = result.median_ttft("agent", BATCH) - result.median_ttft("in-process", BATCH)
    errors = "\n".join(f"- {e}" for e in result.errors[:10])
    text = f"""## Agent overhead: vLLM in-process vs one agent over gRPC

**Result: {verdict(result)}.** The agent adds {signed_ms(single_added)} ms to the time to first
token of a lone request (median of the per-repetition p50s; {signed_ms(batch_added)} ms inside a
batch of {BATCH.concurrency}, see below). From CPU time alone the agent path costs
{added_cpu * 1e6:.0f} us of CPU per token more than in-process, which on this {cores}-core
machine implies a ratio of {implied_ratio:.3f}.

### What is measured

The same vLLM engine (vLLM's CPU build, model `{MODEL}`, `dtype={DTYPE}`,
`max_model_len={MAX_MODEL_LEN}`, `max_num_seqs={MAX_NUM_SEQS}`; the keyword arguments come from
`node_agent.engines.vllm.engine_args`, the function the agent uses) is driven two ways in one
run:

- **in-process**: `AsyncLLM.from_engine_args(...)` inside the bench process, called with
  `AsyncLLM.generate` (`output_kind=DELTA`, as the agent does);
- **agent**: one `python -m node_agent --engine vllm --model {MODEL}
  {" ".join(AGENT_ARGS)}` process, called the way a coordinator calls it: every request on
  one multiplexed `NodeAgent.Session` stream, through the coordinator's own session client
  (`coordinator.session.AgentSession`). No coordinator runs: the agent's `--coordinator`
  points at a closed port, so it keeps retrying to join in the background (a connection
  attempt every few seconds).

Workloads, identical on both sides (16 distinct prompts of about 30 tokens, greedy,
`ignore_eos` so every request makes exactly `max_tokens` tokens):

- `{BATCH.name}`: {BATCH.description}, `max_tokens={BATCH.max_tokens}`; its tokens/s is the
  throughput figure;
- `{SINGLE.name}`: {SINGLE.description}, `max_tokens={SINGLE.max_tokens}`; its TTFT is the
  latency the agent adds to a request when nothing else runs.

Each side is warmed up (a batch of {WARMUP[0].requests} x {WARMUP[0].max_tokens} tokens and
{WARMUP[1].requests} single requests, which also fills vLLM's prefix cache with the prompts on
both sides), then the sides alternate for {result.reps} repetition(s) (in-process first on odd
repetitions, agent first on even ones). Both engines stay up the whole time; the idle one's
CPU use is in the table below. TTFT runs from the call until the first message carrying a
token; tokens/s is tokens received over the wall time of the run; the summary takes the median
over repetitions.

TTFT inside the batch measures how vLLM schedules 16 requests that arrive together, not the
transport: in-process, the 16 `generate` calls are tokenized and queued back to back, and the
first tokens of all 16 usually leave the same engine step (p50 and p99 nearly equal); through
the agent the requests reach the engine spread over a few milliseconds, and in some
repetitions vLLM starts the first ones a step earlier (p50 well below p99), which can make the
agent's median lower. The `single` workload is the one that measures the hop.

### Where the CPU goes

This machine has {cores} core(s), and every process shares them: the vLLM worker (the model's
matrix multiplications, which use all cores through OpenMP/oneDNN, and which spins while it
waits), vLLM's engine-core process (scheduling), vLLM's front end (tokenizing, turning engine
outputs into per-request deltas, detokenizing), and the load generator. In-process, the front
end runs in the bench process next to the load generator; through the agent it runs in the
agent process, which also validates the request, coalesces deltas and serialises each into a
gRPC message, while the bench process parses them. So on this host the agent's cost is CPU
taken from the model, not a separate resource; on a GPU host the model runs on the GPU and the
agent's CPU work overlaps it.

Per generated token in the batch workload (CPU seconds summed over repetitions):

- front end: {front_in * 1e6:.0f} us in-process (bench process, load generator included) vs
  {front_agent * 1e6:.0f} us in the agent process, plus {client_agent * 1e6:.0f} us for the gRPC
  client in the bench process: {added_cpu * 1e6:+.0f} us per token for the agent path;
- vLLM engine core + worker: {engine_in * 1e6:.0f} us in-process vs {engine_agent * 1e6:.0f} us
  behind the agent (mostly the worker's threads, busy or spinning, for as long as the run
  lasts; it moves with the wall time, not with the work).

Other processes on the machine used {100.0 * other_share(result):.0f}% of the cores during the
measured runs (load average before this part: {result.load_before}); that noise is why the
sides alternate and the median is reported, and why the CPU-derived ratio above is the steadier
figure.

### Summary

{summary_table(result)}

### Every run

{runs_table(result)}

CPU columns: `bench` is the bench process (load generator, plus vLLM's front end on the
in-process side); `agent` the agent process; `engine` the vLLM engine-core and worker processes
of the side being measured, `idle engine` those of the other side; `other` the rest of the
machine (`/proc/stat` minus our processes).

- Date: {when}; both engines started at once and were up after {result.startup_s:.1f} s; this
  part took {result.duration_s:.1f} s.
"""
    if errors:
        text += "\n### Errors\n\n" + errors + "\n"
    return text
