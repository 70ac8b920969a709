"""A tour of omni-rpc on this machine.

--engine vllm (the default): a local cluster of vLLM agents serving SmolLM2-135M-Instruct (one
agent per GPU where there are GPUs, two CPU agents otherwise, each bound to its own share of the
cores), with a progress display while the engines load; example questions as chats
(``orch.chat``, rendered by the model's own chat template on the serving node), chat answers
streamed live (``orch.stream_chat``), a node SIGKILLed in the middle of a greedy stream that
another node finishes, and the cluster's statistics.

--engine sim: a local cluster of simulated nodes (no model), example prompts, live streams, a
concurrent burst, and the cluster's statistics.

    make demo                     # = .venv/bin/python scripts/demo.py --engine vllm
    make demo ENGINE=sim          # = .venv/bin/python scripts/demo.py --engine sim
    .venv/bin/python scripts/demo.py --engine sim --nodes 5
    .venv/bin/python scripts/demo.py --cpu-cores none   # vLLM's own CPU binding (all on core 0)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import time
import wave
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node_agent.models import ModelError, prepare
from omni_rpc import DistributedOrchestrator, GenerationError, GenerationResult, config
from omni_rpc.launchers.cpus import CPU_MODES
from omni_rpc.launchers.gpus import visible_gpus
from omni_rpc.launchers.local import Child, LaunchError, LocalCluster, last_log_event
from omni_rpc.sdk.client import CoordinatorClient, CoordinatorUnreachable, state_name

EXAMPLE_PROMPTS = [
    "Generate an image of a sunset",
    "Create a picture of a mountain",
    "Draw a forest landscape",
]
STREAM_PROMPTS = [
    "Describe a lighthouse in a storm",
    "Write a haiku about distributed systems",
    "Explain load balancing to a child",
]
BURST_SIZE = 40
# Slow enough to watch tokens arrive, fast enough to finish in seconds.
SIM_LATENCY = ["--sim-ttft-ms", "150", "--sim-itl-ms", "25"]
ENGINES = ("vllm", "sim")

# -- the vLLM demo -------------------------------------------------------------------------
MODEL = "smollm2-135m-instruct"
# On CPU: small context and batch, float32 (what tests/test_vllm.py runs).
CPU_ENGINE_FLAGS = ["--max-model-len", "256", "--dtype", "float32", "--max-num-seqs", "8"]
GPU_ENGINE_FLAGS = ["--max-model-len", "2048", "--max-num-seqs", "16"]
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Why is the sky blue?",
]
CHAT_TOKENS = 48
FAILOVER_PROMPT = "Tell me a short story about a robot who learns to paint."
FAILOVER_TOKENS = 64
KILL_AFTER_TOKENS = 8


class Phases:
    """Wall time of each named phase, in order, for the closing summary."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.durations: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations.append((name, time.perf_counter() - start))

    def report(self) -> str:
        total = time.perf_counter() - self.started
        lines = [f"  {name:<28} {seconds:6.2f} s" for name, seconds in self.durations]
        lines.append(f"  {'total':<28} {total:6.2f} s")
        return "\n".join(lines)


def heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


async def example_prompts(orchestrator: DistributedOrchestrator) -> None:
    heading("(a) example prompts")
    results: list[GenerationResult] = await orchestrator.generate(EXAMPLE_PROMPTS, max_tokens=12)
    for result in results:
        # Simulated text starts with the space before its first word.
        print(f"Generated: {str(result).lstrip()}")
        print(
            f"    node {result.node_id}, {result.usage['completion_tokens']} tokens, "
            f"finish {result.finish_reason}"
        )


async def live_streams(orchestrator: DistributedOrchestrator) -> None:
    heading("(b) streaming, token by token")
    for prompt in STREAM_PROMPTS:
        print(f"> {prompt}")
        started = False
        async for delta in orchestrator.stream(prompt, max_tokens=20):
            if not started:
                print(f"  [{delta.node_id}]", end="")
                started = True
            print(delta.text, end="", flush=True)
        print(flush=True)
    question = CHAT_QUESTIONS[0]
    print(f"> {question}  (a chat: the node renders it with its model's chat template)")
    node = ""
    async for delta in orchestrator.stream_chat(chat(question), max_tokens=20):
        if not node:
            node = delta.node_id
            print(f"  [{node}]", end="")
        print(delta.text, end="", flush=True)
    print(flush=True)


async def media_round_trip(orchestrator: DistributedOrchestrator, log_dir: Path) -> None:
    """One request for text and audio: the simulated engine's WAV, saved in the logs."""
    heading("Media round trip (the simulated engine's audio output)")
    result = await orchestrator.generate_one(
        "Say hello out loud", max_tokens=8, seed=1, modalities=["text", "audio"]
    )
    (audio,) = result.outputs
    path = await asyncio.to_thread(audio.save, log_dir)
    with wave.open(path) as reader:
        seconds = reader.getnframes() / reader.getframerate()
    print(f"> transcript:{one_line(result.text)}")
    print(f"  {audio.mime_type}, {len(audio.data)} bytes, {seconds:.2f} s, written to {path}")


async def sim_media_round_trip(log_dir: Path) -> None:
    """SmolLM2 writes only text: the media round trip runs on a one-node simulated cluster,
    started beside the vLLM one for the few seconds it takes."""
    async with DistributedOrchestrator(model="sim", num_nodes=1, agent_args=SIM_LATENCY) as sim:
        print("\n(SmolLM2 writes text only: a one-node simulated cluster answers with audio.)")
        await media_round_trip(sim, log_dir)


async def timed_generate(
    orchestrator: DistributedOrchestrator, prompt: str
) -> tuple[GenerationResult, float]:
    start = time.perf_counter()
    result = await orchestrator.generate_one(prompt, max_tokens=16)
    return result, time.perf_counter() - start


async def burst(orchestrator: DistributedOrchestrator, count: int) -> None:
    heading(f"(c) {count} prompts at once")
    prompts = [f"Prompt number {i}: paint scene {i}" for i in range(count)]
    start = time.perf_counter()
    outcomes = await asyncio.gather(
        *(timed_generate(orchestrator, p) for p in prompts), return_exceptions=True
    )
    wall = time.perf_counter() - start
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    latencies = sorted(seconds for _, seconds in done)
    tokens = sum(r.usage["completion_tokens"] for r, _ in done)
    per_node = Counter(r.node_id for r, _ in done)
    print(
        f"  {len(done)}/{count} succeeded in {wall:.2f} s, {tokens} tokens "
        f"({tokens / wall:.0f} tokens/s)"
    )
    if latencies:
        print(f"  latency: median {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s")
    print("  served by: " + ", ".join(f"{n} {c}" for n, c in sorted(per_node.items())))
    for error in failed[:3]:
        print(f"  failed: {error}")


def print_stats(stats: dict[str, Any]) -> None:
    heading("(d) Cluster Statistics")
    unhealthy = ", ".join(stats["unhealthy_nodes"]) or "none"
    print(f"- Total nodes: {stats['num_nodes']}")
    print(f"- Healthy nodes: {len(stats['healthy_nodes'])} ({', '.join(stats['healthy_nodes'])})")
    print(f"- Unhealthy nodes: {unhealthy}")
    print(f"- Load distribution: {stats['load_distribution']}")
    print(
        f"- Requests: {stats['requests_total']} total, {stats['requests_succeeded']} "
        f"succeeded, {stats['requests_failed']} failed, {stats['retries_total']} retries"
    )
    print(f"- Strategy: {stats['strategy']}")
    print("- Health details:")
    for node_id, node in stats["health_stats"].items():
        print(
            f"    {node_id}: {node['state']}, served {node['served']}, "
            f"failures {node['failures']}, address {node['address']}"
        )


async def run(args: argparse.Namespace, phases: Phases) -> None:
    print(f"Starting a local cluster: 1 coordinator + {args.nodes} simulated nodes ...", flush=True)
    orchestrator: DistributedOrchestrator | None = None
    try:
        with phases.phase("start-up"):
            orchestrator = DistributedOrchestrator(
                model="sim", num_nodes=args.nodes, engine=args.engine, agent_args=SIM_LATENCY
            )
            await asyncio.to_thread(orchestrator.wait_ready)
        assert orchestrator.cluster is not None
        print(f"Coordinator at {orchestrator.coordinator}, logs in {orchestrator.cluster.log_dir}")
        print(f"HTTP front door (OpenAI-compatible): {orchestrator.http_url}")
        with phases.phase("(a) example prompts"):
            await example_prompts(orchestrator)
        with phases.phase("(b) live streams"):
            await live_streams(orchestrator)
        with phases.phase("(b') media round trip"):
            await media_round_trip(orchestrator, orchestrator.cluster.log_dir or Path.cwd())
        with phases.phase(f"(c) burst of {BURST_SIZE}"):
            await burst(orchestrator, BURST_SIZE)
        with phases.phase("(d) statistics"):
            print_stats(orchestrator.get_stats())
    finally:
        if orchestrator is not None:
            with phases.phase("shut-down"):
                await orchestrator.aclose()


# -- the vLLM demo -------------------------------------------------------------------------


def chat(question: str) -> list[dict[str, str]]:
    """One user turn, as OpenAI's chat API has it: the serving node renders it with the
    model's own chat template (SmolLM2's adds its default system turn)."""
    return [{"role": "user", "content": question}]


def one_line(text: str) -> str:
    return " ".join(text.split())


def placement(nodes: int, gpus: list[int]) -> tuple[list[str], dict[int, list[str]], str]:
    """Engine flags for every agent, per-agent flags (its GPU) and a description."""
    if not gpus:
        return CPU_ENGINE_FLAGS, {}, f"{nodes} CPU agents (no GPU found)"
    per_gpu = -(-nodes // len(gpus))  # agents sharing one GPU
    per_agent: dict[int, list[str]] = {}
    for index in range(nodes):
        flags = ["--gpu", str(gpus[index % len(gpus)])]
        if per_gpu > 1:
            share = round(0.85 / per_gpu, 2)
            flags += ["--engine-arg", f"gpu_memory_utilization={share}"]
        per_agent[index] = flags
    where = "one per GPU" if per_gpu == 1 else f"{per_gpu} per GPU"
    return GPU_ENGINE_FLAGS, per_agent, f"{nodes} agents on {len(gpus)} GPU(s), {where}"


class Progress:
    """One status line, refreshed in place on a terminal; elsewhere (a pipe, a CI log) a new
    line when what it says changes, at most every 3 s, and every 10 s regardless."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.shown = ""
        self.text = ""
        self.last_print = 0.0

    def update(self, elapsed: float, parts: list[tuple[str, str]]) -> None:
        text = " | ".join(f"{name}: {what}" for name, what in parts)
        line = f"  [{elapsed:4.0f} s] {text}"
        if self.tty:
            line = line[: shutil.get_terminal_size().columns - 1]
            print("\r" + line.ljust(len(self.shown)), end="", flush=True)
            self.shown = line
            return
        since = time.monotonic() - self.last_print
        if (text != self.text and since >= 3.0) or since >= 10.0:
            print(line[:160], flush=True)
            self.text, self.last_print = text, time.monotonic()

    def done(self) -> None:
        if self.tty and self.shown:
            print(flush=True)
            self.shown = ""


async def wait_for_engines(cluster: LocalCluster, timeout_s: float) -> None:
    """Until every agent has joined the coordinator and is healthy, show once a second each
    node's state (from the coordinator) and the last line of its agent's log."""
    client = CoordinatorClient(cluster.coordinator_address, timeout_s=2.0)
    progress = Progress()
    start = time.monotonic()
    ready: set[str] = set()
    try:
        while True:
            cluster.check_alive()  # an agent that exits while loading: LaunchError, its log
            try:
                states = {n.node_id: state_name(n.state) for n in client.nodes()}
            except CoordinatorUnreachable:
                states = {}
            parts = []
            for agent in cluster.agents:
                state = states.get(agent.name, "loading")
                # Before its first line the agent is importing vLLM (and torch): many seconds.
                detail = (
                    "" if state == "healthy" else last_log_event(agent.log_path) or "importing vLLM"
                )
                parts.append((agent.name, f"{state} ({detail[:44]})" if detail else state))
            elapsed = time.monotonic() - start
            for agent in cluster.agents:
                if states.get(agent.name) == "healthy" and agent.name not in ready:
                    ready.add(agent.name)
                    progress.done()
                    print(f"  {agent.name} joined the coordinator, healthy, after {elapsed:.0f} s")
            if len(ready) == len(cluster.agents):
                print(f"  all {len(ready)} engines loaded after {elapsed:.0f} s")
                return
            progress.update(elapsed, parts)
            if elapsed > timeout_s:
                progress.done()
                raise TimeoutError(
                    f"{len(ready)}/{len(cluster.agents)} nodes healthy after {timeout_s:.0f} s "
                    f"(logs in {cluster.log_dir})"
                )
            await asyncio.sleep(1.0)
    finally:
        progress.done()
        client.close()


async def vllm_example_prompts(orchestrator: DistributedOrchestrator) -> None:
    heading("(a) example prompts (as chats, at once, greedy)")
    start = time.perf_counter()
    results: list[GenerationResult] = await asyncio.gather(
        *(orchestrator.chat(chat(p), max_tokens=40, temperature=0.0) for p in EXAMPLE_PROMPTS)
    )
    wall = time.perf_counter() - start
    for prompt, result in zip(EXAMPLE_PROMPTS, results, strict=True):
        print(f"> {prompt}")
        print(f"Generated: {one_line(str(result))}")
        print(
            f"    node {result.node_id}, {result.usage['completion_tokens']} tokens, "
            f"finish {result.finish_reason}"
        )
    tokens = sum(r.usage["completion_tokens"] for r in results)
    print(
        f"  {len(results)} chats at once: {tokens} tokens in {wall:.2f} s, "
        f"{tokens / wall:.1f} tokens/s across the cluster"
    )


async def vllm_live_streams(orchestrator: DistributedOrchestrator) -> None:
    heading("(b) chat, streamed token by token")
    for question in CHAT_QUESTIONS:
        print(f"> {question}")
        node = ""
        tokens = 0
        start = time.perf_counter()
        first = 0.0
        async for delta in orchestrator.stream_chat(
            chat(question), max_tokens=CHAT_TOKENS, temperature=0.0
        ):
            if delta.node_id != node:
                node = delta.node_id
                first = time.perf_counter() - start
                print(f"  [{node}] ", end="")
            tokens += len(delta.token_ids)
            print(delta.text.replace("\n", "\n      "), end="", flush=True)
        wall = time.perf_counter() - start
        rate = (tokens - 1) / (wall - first) if tokens > 1 and wall > first else 0.0
        print(f"\n      ({tokens} tokens, first after {first:.2f} s, then {rate:.1f} tokens/s)")


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (read from /proc; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_node(agent: Child) -> str:
    """SIGKILL the agent, as a crashed machine would vanish, then the vLLM engine processes it
    started (a SIGKILLed agent cannot stop them, and they would outlive the demo)."""
    engine_processes = descendants(agent.process.pid)
    os.kill(agent.process.pid, signal.SIGKILL)
    for pid in engine_processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.process.wait()
    return (
        f"SIGKILL {agent.name} (pid {agent.process.pid}, "
        f"and its {len(engine_processes)} engine processes)"
    )


async def failover(orchestrator: DistributedOrchestrator, cluster: LocalCluster) -> None:
    heading("(c) failover: a node SIGKILLed in the middle of a stream")
    sampling: dict[str, Any] = {
        "max_tokens": FAILOVER_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    messages = chat(FAILOVER_PROMPT)
    print(f"> {FAILOVER_PROMPT}  (greedy, {FAILOVER_TOKENS} tokens)")
    reference = await orchestrator.chat(messages, **sampling)
    print(f"  undisturbed run on {reference.node_id}: {one_line(reference.text)[:90]}...")
    print(f"  again, and SIGKILL the node serving it after {KILL_AFTER_TOKENS} tokens:")
    text = ""
    ids: list[int] = []
    nodes: list[str] = []
    attempt = 0
    killed_at = 0.0
    last = None
    async for delta in orchestrator.stream_chat(messages, **sampling):
        if delta.attempt != attempt or (nodes and delta.node_id != nodes[-1]):
            if attempt:
                gap = time.perf_counter() - killed_at
                print(
                    f"\n  >>> switched: {nodes[-1]} -> {delta.node_id} (attempt {delta.attempt}), "
                    f"resumed after {len(ids)} tokens, {gap:.2f} s after the kill <<<"
                )
            print(f"  [{delta.node_id}] ", end="")
            attempt = delta.attempt
            nodes.append(delta.node_id)
        text += delta.text
        ids += delta.token_ids
        print(delta.text.replace("\n", "\n      "), end="", flush=True)
        last = delta
        if not killed_at and len(ids) >= KILL_AFTER_TOKENS:
            victim = next(a for a in cluster.agents if a.name == delta.node_id)
            what = await asyncio.to_thread(kill_node, victim)
            killed_at = time.perf_counter()
            print(f" <-- {what} -->", end="", flush=True)
    print()
    assert last is not None and last.usage is not None
    print(
        f"  finished: {len(ids)} tokens, finish {last.finish_reason}, served by "
        f"{' then '.join(nodes)} in {attempt} attempt(s)"
    )
    if text == reference.text and ids == reference.token_ids:
        print("  identical to the undisturbed run: yes, token for token")
    else:
        pairs = zip(ids, reference.token_ids, strict=False)
        where = next(
            (i for i, (a, b) in enumerate(pairs) if a != b), min(len(ids), FAILOVER_TOKENS)
        )
        print(f"  identical to the undisturbed run: NO, they differ from token {where} on")
    # The coordinator saw the node go (its health watch broke): wait a moment for the state.
    victim_id = nodes[0]
    for _ in range(50):
        if victim_id in orchestrator.get_stats()["unhealthy_nodes"]:
            break
        await asyncio.sleep(0.1)


async def run_vllm(args: argparse.Namespace, phases: Phases) -> None:
    with phases.phase("prepare model"):
        print(f"Preparing the model {MODEL} (built once, then cached) ...", flush=True)
        start = time.perf_counter()
        path = await asyncio.to_thread(prepare, MODEL)
        print(f"  ready in {time.perf_counter() - start:.1f} s: {path}")
    gpus = visible_gpus()
    nodes = args.nodes or max(2, len(gpus))
    agent_args, per_agent, where = placement(nodes, gpus)
    print(f"Starting a local cluster: 1 coordinator + {where}, vLLM with {MODEL} ...", flush=True)
    cluster = LocalCluster(
        num_nodes=nodes,
        engine="vllm",
        model=MODEL,
        agent_args=agent_args,
        per_agent_args=dict(per_agent),
        http_listen="127.0.0.1:0",
        cpu_cores=args.cpu_cores,
    )
    orchestrator: DistributedOrchestrator | None = None
    try:
        with phases.phase(f"engine load ({nodes} nodes)"):
            await asyncio.to_thread(cluster.start)
            print(f"Coordinator at {cluster.coordinator_address}, logs in {cluster.log_dir}")
            print(f"HTTP front door (OpenAI-compatible): {cluster.http_url}")
            if cluster.agent_cores:
                cores = ", ".join(
                    f"{a.name} {c}"
                    for a, c in zip(cluster.agents, cluster.agent_cores, strict=True)
                )
                print(f"CPU cores: {cores}")
            elif not gpus:
                print("CPU cores: vLLM's own binding (--cpu-cores none)")
            print("Loading the engines (each node joins the coordinator once its model is up):")
            await wait_for_engines(cluster, config.STARTUP_TIMEOUT_S["vllm"])
        orchestrator = DistributedOrchestrator(
            coordinator=cluster.coordinator_address, timeout=300, http_url=cluster.http_url
        )
        with phases.phase("(a) example prompts"):
            await vllm_example_prompts(orchestrator)
        with phases.phase("(b) live streams"):
            await vllm_live_streams(orchestrator)
        with phases.phase("(b') media round trip"):
            await sim_media_round_trip(cluster.log_dir or Path.cwd())
        if nodes >= 2:
            with phases.phase("(c) failover"):
                await failover(orchestrator, cluster)
        else:
            heading("(c) failover: skipped, it needs a second node")
        with phases.phase("(d) statistics"):
            print_stats(orchestrator.get_stats())
    finally:
        with phases.phase("shut-down"):
            if orchestrator is not None:
                await orchestrator.aclose()
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engine",
        default="vllm",
        choices=ENGINES,
        help="engine of every node: vllm (SmolLM2 on the GPUs or the CPU) or sim (default: vllm)",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        help="number of nodes (default: sim 3; vllm one per GPU, at least 2)",
    )
    parser.add_argument(
        "--cpu-cores",
        default="auto",
        choices=CPU_MODES,
        help="vLLM agents without GPUs: auto gives each its own share of the cores, none leaves "
        "vLLM's own binding (every agent on the same cores) (default: auto)",
    )
    args = parser.parse_args(argv)
    if args.nodes is not None and args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    if args.engine == "sim" and args.nodes is None:
        args.nodes = 3
    phases = Phases()
    try:
        asyncio.run(run(args, phases) if args.engine == "sim" else run_vllm(args, phases))
    except ModelError as exc:
        print(f"\ndemo failed: the model could not be prepared: {exc}", file=sys.stderr)
        return 1
    except (LaunchError, TimeoutError) as exc:
        print(f"\ndemo failed: the local cluster did not start: {exc}", file=sys.stderr)
        return 1
    except GenerationError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        heading("where the time went")
        print(phases.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
