"""A tour of omni-rpc on this machine: a local cluster of simulated nodes, the seed's prompts,
live streams, a concurrent burst, and the cluster's statistics.

    make demo                     # = .venv/bin/python scripts/demo.py --engine sim
    .venv/bin/python scripts/demo.py --nodes 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omni_rpc import DistributedOrchestrator, GenerationError, GenerationResult
from omni_rpc.launcher import LaunchError

SEED_PROMPTS = [
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
ENGINES = ("sim",)


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


async def seed_prompts(orchestrator: DistributedOrchestrator) -> None:
    heading("(a) the seed's prompts")
    results: list[GenerationResult] = await orchestrator.generate(SEED_PROMPTS, max_tokens=12)
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
        with phases.phase("(a) seed prompts"):
            await seed_prompts(orchestrator)
        with phases.phase("(b) live streams"):
            await live_streams(orchestrator)
        with phases.phase(f"(c) burst of {BURST_SIZE}"):
            await burst(orchestrator, BURST_SIZE)
        with phases.phase("(d) statistics"):
            print_stats(orchestrator.get_stats())
    finally:
        if orchestrator is not None:
            with phases.phase("shut-down"):
                await orchestrator.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", default="sim", help="engine of every node (only 'sim' now)")
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    args = parser.parse_args(argv)
    if args.engine not in ENGINES:
        parser.error(
            f"engine {args.engine!r} is not available in this version; "
            f"the demo runs with the simulated engine: --engine sim"
        )
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    phases = Phases()
    try:
        asyncio.run(run(args, phases))
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
