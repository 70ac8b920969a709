"""Limits and backpressure: each limit hit on purpose is RESOURCE_EXHAUSTED naming it, the
cluster keeps serving others, and a flood of refused calls leaves memory bounded."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from omni_rpc.launchers.local import LocalCluster
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2
from tests.conftest import wait_until

MakeCluster = Callable[..., LocalCluster]

# Slow streams (40 x 50 ms) to hold slots while a limit is probed.
SLOW_SIM = ["--sim-ttft-ms", "5", "--sim-itl-ms", "50", "--sim-max-concurrency", "2"]


def request(prompt: str = "hello", max_tokens: int = 4) -> generate_pb2.GenerateRequest:
    message = generate_pb2.GenerateRequest(prompt=prompt)
    message.sampling.max_tokens = max_tokens
    return message


def refusal(channel: grpc.Channel, message: generate_pb2.GenerateRequest) -> tuple[str, str]:
    """(code name, details) of a call expected to fail; ("OK", "") if it did not."""
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    try:
        list(stub.Generate(message, timeout=20))
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def serves(channel: grpc.Channel) -> bool:
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    return list(stub.Generate(request(), timeout=20))[-1].finish_reason != ""


@contextmanager
def held_streams(channel: grpc.Channel, count: int) -> Iterator[None]:
    """``count`` slow streams in flight (each has sent its first token) until the block ends."""
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    calls: list[Any] = [stub.Generate(request(max_tokens=40), timeout=60) for _ in range(count)]
    started = threading.Semaphore(0)

    def consume(call: Any) -> None:
        try:
            for index, _ in enumerate(call):
                if index == 0:
                    started.release()
        except grpc.RpcError:
            started.release()

    threads = [threading.Thread(target=consume, args=(c,), daemon=True) for c in calls]
    for thread in threads:
        thread.start()
    for _ in calls:
        assert started.acquire(timeout=30), "a held stream never started"
    try:
        yield
    finally:
        for call in calls:
            call.cancel()
        for thread in threads:
            thread.join(10)


def two_client_tokens(tmp_path: Path) -> tuple[Path, str, str]:
    path = tmp_path / "clients.token"
    path.write_text("# two clients\nclient-a-token\nclient-b-token\n")
    return path, "client-a-token", "client-b-token"


def test_size_limits(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(
        2,
        coordinator_args=[
            "--max-prompt-bytes",
            "1000",
            "--max-tokens-cap",
            "100",
            "--max-message-bytes",
            "65536",
        ],
    )
    channel = grpc.insecure_channel(cluster.coordinator_address)
    try:
        code, details = refusal(channel, request(prompt="x" * 1001))
        assert code == "RESOURCE_EXHAUSTED" and "max_prompt_bytes=1000" in details
        ids = generate_pb2.GenerateRequest(prompt_token_ids=list(range(251)))
        code, details = refusal(channel, ids)
        assert code == "RESOURCE_EXHAUSTED" and "max_prompt_bytes=1000" in details
        code, details = refusal(channel, request(max_tokens=101))
        assert code == "RESOURCE_EXHAUSTED" and "max_tokens_cap=100" in details
        code, details = refusal(channel, request(prompt="x" * 70_000))
        assert code == "RESOURCE_EXHAUSTED" and "65536" in details  # gRPC's message limit
        assert serves(channel)
        assert len(cluster.agents) == 2 and all(a.alive for a in cluster.agents)
    finally:
        channel.close()


def test_streams_per_client_and_in_total(make_cluster: MakeCluster, tmp_path: Path) -> None:
    tokens, a, b = two_client_tokens(tmp_path)
    cluster = make_cluster(
        2,
        auth=True,
        agent_args=SLOW_SIM,
        coordinator_args=[
            "--client-token-file",
            str(tokens),
            "--max-streams-per-client",
            "2",
            "--max-streams",
            "3",
        ],
    )
    address = cluster.coordinator_address
    as_a = ChannelSecurity(token=a).sync_channel(address)
    as_b = ChannelSecurity(token=b).sync_channel(address)
    try:
        with held_streams(as_a, 2):
            code, details = refusal(as_a, request())
            assert code == "RESOURCE_EXHAUSTED" and "max_streams_per_client=2" in details
            assert serves(as_b)  # another client is not held back by a's limit
            with held_streams(as_b, 1):
                code, details = refusal(as_b, request())
                assert code == "RESOURCE_EXHAUSTED" and "max_streams=3" in details
        assert serves(as_a) and serves(as_b)  # slots are given back
    finally:
        as_a.close()
        as_b.close()


def test_admission_queue_is_bounded_when_every_node_is_saturated(
    make_cluster: MakeCluster,
) -> None:
    # 2 nodes x 2 slots = capacity 4, plus 1 queued: the 6th concurrent call is refused.
    cluster = make_cluster(2, agent_args=SLOW_SIM, coordinator_args=["--max-queue", "1"])
    channel = grpc.insecure_channel(cluster.coordinator_address)
    try:
        with held_streams(channel, 4):
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            queued = stub.Generate(request(max_tokens=2), timeout=60)
            # The queued call holds its slot as soon as the coordinator has admitted it.
            wait_until(
                lambda: refusal(channel, request())[0] == "RESOURCE_EXHAUSTED",
                30,
                "the queue full",
            )
            code, details = refusal(channel, request())
            assert code == "RESOURCE_EXHAUSTED" and "max_queue=1" in details
        assert list(queued)[-1].finish_reason  # the queued call was served once slots freed
        assert serves(channel)
    finally:
        channel.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(240)
def test_memory_stays_bounded_under_a_flood_of_refused_calls(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(1, auth=True, coordinator_args=["--max-prompt-bytes", "4096"])
    assert cluster.coordinator is not None
    pid = cluster.coordinator.process.pid
    address = cluster.coordinator_address
    token = cluster.tokens["client"]
    # Over the prompt limit: refused before any node is involved. Large, so that keeping the
    # refused prompts (the leak this test is for) would cost many times the growth bound.
    big = "y" * 65536
    bound = 40 * 1024 * 1024
    assert 5000 * len(big) > 5 * bound  # the leak to catch is far above the noise allowed

    async def flood(calls: int) -> dict[str, int]:
        outcomes: dict[str, int] = {}
        good = ChannelSecurity(token=token).aio_channel(address)
        bad = ChannelSecurity(token="wrong").aio_channel(address)
        stubs = [coordinator_pb2_grpc.CoordinatorStub(c) for c in (good, bad)]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(calls):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    async for _ in stubs[i % 2].Generate(request(prompt=big), timeout=30):
                        pass
                    outcomes["OK"] = outcomes.get("OK", 0) + 1
                except grpc.aio.AioRpcError as exc:
                    outcomes[exc.code().name] = outcomes.get(exc.code().name, 0) + 1

        await asyncio.gather(*(worker() for _ in range(32)))
        await good.close(None)
        await bad.close(None)
        return outcomes

    asyncio.run(flood(1000))  # warm-up: allocator pools and caches settle
    before = rss_bytes(pid)
    outcomes = asyncio.run(flood(10_000))
    after = rss_bytes(pid)
    assert outcomes == {"RESOURCE_EXHAUSTED": 5000, "UNAUTHENTICATED": 5000}
    growth = after - before
    assert growth < bound, f"coordinator RSS grew by {growth / 2**20:.1f} MiB"
    assert after < 400 * 1024 * 1024, f"coordinator RSS {after / 2**20:.1f} MiB"
    channel = cluster.client_security("client").sync_channel(address)
    try:
        assert serves(channel)
    finally:
        channel.close()
