"""Several coordinators at once: agents join each, SDK clients hold every address, and a stream
whose coordinator dies (SIGKILL) or freezes (SIGSTOP) continues on another, exactly once.

Real processes on loopback: two coordinators, simulated agents, one SDK orchestrator.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node_agent.engines.sim import simulate
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.sdk import DistributedOrchestrator
from omni_rpc.sdk.client import CoordinatorClient, node_dict
from tests.conftest import agent_load, record, wait_until
from tests.test_cli import omni

MakeCluster = Callable[..., LocalCluster]

# Sim agents slow enough that every stream is mid-way when a coordinator goes, with room for
# 500 streams at once (no queueing behind a concurrency limit).
HA_SIM = [
    *("--sim-ttft-ms", "5", "--sim-itl-ms", "150", "--sim-itl-growth", "0"),
    *("--sim-max-concurrency", "512"),
]
MAX_TOKENS = 40


def healthy_at(address: str) -> list[str]:
    client = CoordinatorClient(address)
    try:
        return sorted(client.stats().healthy_nodes)
    except ConnectionError:
        return []
    finally:
        client.close()


def wait_every_coordinator(cluster: LocalCluster, count: int, timeout: float = 60.0) -> None:
    for address in cluster.coordinator_addresses:

        def ready(at: str = address) -> bool:
            return len(healthy_at(at)) >= count

        wait_until(ready, timeout, f"{count} healthy at {address}")


def stats_at(address: str) -> dict[str, int]:
    client = CoordinatorClient(address)
    try:
        stats = client.stats()
        return {"resumes_total": stats.resumes_total, "requests_total": stats.requests_total}
    finally:
        client.close()


@dataclass
class Stream:
    prompt: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    # Monotonic arrival time of each delta.
    arrivals: list[float] = field(default_factory=list)

    def check(self) -> None:
        expected = simulate(self.prompt, max_tokens=MAX_TOKENS, seed=11)
        assert self.token_ids == expected.token_ids, self.prompt  # no duplicate, no gap
        assert self.text == expected.text, self.prompt
        assert self.finish_reason == "length"
        assert self.usage == {
            "prompt_tokens": expected.prompt_tokens,
            "completion_tokens": MAX_TOKENS,
            "cached_prompt_tokens": 0,
        }


async def run_stream(orch: DistributedOrchestrator, stream: Stream) -> None:
    async for delta in orch.stream(stream.prompt, max_tokens=MAX_TOKENS, seed=11):
        stream.arrivals.append(time.monotonic())
        stream.token_ids += delta.token_ids
        stream.text += delta.text
        stream.finish_reason = delta.finish_reason
        stream.usage = delta.usage or stream.usage


async def wait_streaming(streams: list[Stream], at_least: int) -> None:
    """Until every stream has ``at_least`` tokens (synchronised on what was received)."""
    while any(len(s.token_ids) < at_least for s in streams):
        assert not any(s.finish_reason for s in streams), "a stream ended before the fault"
        await asyncio.sleep(0.01)


async def test_sigkill_of_a_coordinator_loses_and_repeats_nothing(
    make_cluster: MakeCluster,
) -> None:
    cluster = make_cluster(4, wait=False, num_coordinators=2, agent_args=HA_SIM)
    wait_every_coordinator(cluster, 4)
    first, second = cluster.coordinator_addresses
    orch = DistributedOrchestrator(coordinator=[first, second], timeout=120)
    streams = [Stream(f"stream {i} of five hundred") for i in range(500)]
    tasks = [asyncio.create_task(run_stream(orch, s)) for s in streams]
    try:
        await wait_streaming(streams, 3)
        # Both coordinators carry streams (round robin over the two addresses).
        assert stats_at(first)["requests_total"] > 100 and stats_at(second)["requests_total"] > 100
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill_coordinator, 0)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        for task in tasks:
            task.cancel()
    for stream in streams:
        stream.check()
    # Every stream that was on the dead coordinator continued on the other from its resume
    # point (no node failed: each resume there is a client's).
    resumed = stats_at(second)["resumes_total"]
    assert resumed >= 100
    # The longest wait of a stream for its next token across the kill.
    gap = max(
        max(
            (b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False) if b > killed_at),
            default=0.0,
        )
        for s in streams
    )
    record("coordinator SIGKILL, 500 streams", resumed_streams=resumed, longest_gap_s=round(gap, 3))

    # The agents aborted the dead coordinator's requests (its sessions broke): nothing runs on
    # for a coordinator that is gone.
    addresses = [n.address for n in CoordinatorClient(second).nodes()]
    loads = [await agent_load(a) for a in addresses]
    assert sum(load.aborted for load in loads) >= resumed
    assert all(load.requests == 0 for load in loads)

    # Restarted, it is re-joined by every agent within a few seconds.
    restarted = time.monotonic()
    await asyncio.to_thread(cluster.restart_coordinator, 30.0, 0)
    await asyncio.to_thread(
        wait_until, lambda: len(healthy_at(first)) == 4, 15.0, "4 agents back at the restarted one"
    )
    reacquired_s = time.monotonic() - restarted
    record("coordinator restart, agents re-joined", seconds=round(reacquired_s, 2))
    # New calls use it again.
    again = [Stream(f"after the restart {i}") for i in range(20)]
    await asyncio.gather(*(run_stream(orch, s) for s in again))
    for stream in again:
        stream.check()
    assert stats_at(first)["requests_total"] > 0
    await orch.aclose()


async def test_a_frozen_coordinator_is_left_within_the_keepalive_bound(
    make_cluster: MakeCluster,
) -> None:
    """SIGSTOP: the connection stays open and silent. The client's keepalive (1 s ping, 1 s
    timeout here) gives it up, and its streams continue on the other coordinator; the agents'
    own keepalive (the same) aborts the frozen coordinator's requests."""
    keepalive = ["--keepalive-time", "1", "--keepalive-timeout", "1"]
    cluster = make_cluster(2, wait=False, num_coordinators=2, agent_args=[*HA_SIM, *keepalive])
    wait_every_coordinator(cluster, 2)
    first, second = cluster.coordinator_addresses
    orch = DistributedOrchestrator(
        coordinator=f"{first},{second}", timeout=60, keepalive_time=1.0, keepalive_timeout=1.0
    )
    streams = [Stream(f"frozen {i}") for i in range(40)]
    tasks = [asyncio.create_task(run_stream(orch, s)) for s in streams]
    frozen = cluster.coordinators[0].process.pid
    try:
        await wait_streaming(streams, 3)
        stopped_at = time.monotonic()
        os.kill(frozen, signal.SIGSTOP)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        gaps = [
            max(
                (b - a for a, b in zip(s.arrivals, s.arrivals[1:], strict=False) if b > stopped_at),
                default=0.0,
            )
            for s in streams
        ]
        for stream in streams:
            stream.check()
        # The streams on the frozen one waited for the keepalive (about 1-2 s), then went on:
        # keepalive_time + keepalive_timeout, plus slack for a loaded machine.
        assert max(gaps) >= 0.9
        assert max(gaps) < 1.0 + 1.0 + 4.0
        assert stats_at(second)["resumes_total"] >= 1
        record("coordinator SIGSTOP, keepalive 1 s + 1 s", longest_gap_s=round(max(gaps), 3))
        # The agents gave up the frozen coordinator's sessions and aborted its requests.
        addresses = [n.address for n in CoordinatorClient(second).nodes()]

        def aborted() -> int:
            return sum(asyncio.run(agent_load(a)).aborted for a in addresses)

        await asyncio.to_thread(wait_until, aborted, 10.0, "the frozen coordinator's aborts")
    finally:
        os.kill(frozen, signal.SIGCONT)
        for task in tasks:
            task.cancel()
    await orch.aclose()


def node_states(address: str) -> dict[str, str]:
    client = CoordinatorClient(address)
    try:
        return {n.node_id: node_dict(n)["state"] for n in client.nodes()}
    finally:
        client.close()


def test_omni_drain_reaches_every_coordinator(make_cluster: MakeCluster) -> None:
    """Each coordinator has its own registry: a drain (and an undrain) must reach all of them,
    or the others keep sending the node new work."""
    cluster = make_cluster(2, wait=False, num_coordinators=2)
    wait_every_coordinator(cluster, 2)
    both = cluster.coordinator_target
    drained = omni("drain", "node-0", "--wait", "--timeout", "20", "--coordinator", both)
    assert drained.returncode == 0, drained.stderr
    for address in cluster.coordinator_addresses:
        assert f"coordinator {address}:" in drained.stdout
        assert node_states(address) == {"node-0": "draining", "node-1": "healthy"}
    undrained = omni("undrain", "node-0", "--coordinator", both)
    assert undrained.returncode == 0, undrained.stderr
    for address in cluster.coordinator_addresses:
        assert node_states(address) == {"node-0": "healthy", "node-1": "healthy"}
