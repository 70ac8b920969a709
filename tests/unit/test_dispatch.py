"""Dispatch in process: classification, failover, exact resumption, backoff inside deadlines.

Fake nodes (tests/unit/fakes.py) stand in for agents and the loop runs on virtual time, so
every timing below is exact: "the call gave up after 30 s" means 30 s of virtual time.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import grpc
import pytest

from coordinator.balancer import Balancer
from coordinator.dispatch import AttemptError, Dispatcher, DispatchError, Failure, classify
from coordinator.registry import HEALTHY, UNHEALTHY, Node, Registry
from coordinator.strategies import CacheAware, LeastLoaded, RoundRobin
from omni_rpc.metrics import CoordinatorMetrics
from omni_rpc.v1 import generate_pb2
from tests.unit.clock import VirtualClock
from tests.unit.fakes import (
    FAKE_BYTES_PER_TOKEN,
    FakeFleet,
    FakeNode,
    Fault,
    expected_tokens,
    join_request,
    text_of,
)

PROMPT = "the capital of France is"


def healthy(registry: Registry, fleet: FakeFleet, *node_ids: str, **fake: float) -> list[Node]:
    nodes = []
    for node_id in node_ids:
        fleet.add(FakeNode(node_id, **fake))
        node, _ = registry.join(join_request(node_id))
        registry.report_probe(node, True, False, "health check: SERVING")
        assert node.state == HEALTHY
        nodes.append(node)
    return nodes


def dispatcher(
    registry: Registry, max_retries: int = 2, no_node_wait_s: float = 30.0
) -> Dispatcher:
    return Dispatcher(
        registry,
        Balancer(registry, RoundRobin()),
        max_retries,
        no_node_wait_s=no_node_wait_s,
        metrics=CoordinatorMetrics(),
    )


def request(prompt: str = PROMPT, max_tokens: int = 16) -> generate_pb2.GenerateRequest:
    r = generate_pb2.GenerateRequest(prompt=prompt)
    r.sampling.max_tokens = max_tokens
    return r


async def collect(
    stream: AsyncIterator[generate_pb2.GenerateResponse],
) -> list[generate_pb2.GenerateResponse]:
    return [response async for response in stream]


def tokens(responses: list[generate_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def test_classification() -> None:
    assert classify(grpc.StatusCode.RESOURCE_EXHAUSTED) is Failure.BUSY
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
        assert classify(code) is Failure.REQUEST
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
    ):
        assert classify(code) is Failure.NODE
    assert str(AttemptError("n1", grpc.StatusCode.INTERNAL, "boom")) == "n1: INTERNAL boom"


async def test_a_call_streams_the_node_output_once(registry: Registry, fleet: FakeFleet) -> None:
    (node,) = healthy(registry, fleet, "n1")
    d = dispatcher(registry)
    out = await collect(d.generate(request(), None))
    assert tokens(out) == expected_tokens(PROMPT)
    assert "".join(r.text for r in out) == "".join(map(text_of, expected_tokens(PROMPT)))
    assert out[-1].finish_reason == "length" and out[-1].attempt == 1
    assert out[0].request_id  # filled in by the dispatcher
    assert (node.served, node.in_flight, node.dispatched) == (1, 0, 1)
    c = d.counters
    assert (c.requests_total, c.requests_succeeded, c.retries_total, c.in_flight) == (1, 1, 0, 0)


@pytest.mark.parametrize("after", [0, 1, 7, 15])
async def test_a_broken_stream_resumes_on_another_node_token_for_token(
    registry: Registry, fleet: FakeFleet, after: int
) -> None:
    first, second = healthy(registry, fleet, "n1", "n2")
    fleet.nodes["n1"].fail_next(Fault(after_tokens=after, code=grpc.StatusCode.UNAVAILABLE))
    d = dispatcher(registry)
    out = await collect(d.generate(request(), None))

    assert tokens(out) == expected_tokens(PROMPT)  # every token exactly once, in order
    assert [r.node_id for r in out] == ["n1"] * after + ["n2"] * (16 - after)
    resumed = fleet.nodes["n2"].attempts[-1]
    assert list(resumed.resume.token_ids) == expected_tokens(PROMPT)[:after]
    assert resumed.resume.text == "".join(map(text_of, expected_tokens(PROMPT)[:after]))
    assert resumed.attempt == 2
    assert d.counters.resumes_total == (1 if after else 0)
    assert d.counters.retries_total == 1
    # UNAVAILABLE on a real request: the node is taken out of rotation at once.
    assert first.failures == 1 and first.state == UNHEALTHY
    assert second.served == 1 and first.in_flight == second.in_flight == 0


@pytest.mark.parametrize("after", [1, 9])
async def test_a_client_resume_point_continues_the_stream_on_any_coordinator(
    registry: Registry, fleet: FakeFleet, after: int
) -> None:
    """GenerateRequest.resume (the client's coordinator died mid-stream): this coordinator
    sends only what comes next, and breaks nothing if a node then fails too."""
    healthy(registry, fleet, "n1", "n2")
    whole = expected_tokens(PROMPT)
    fleet.nodes["n1"].fail_next(Fault(after_tokens=3, code=grpc.StatusCode.UNAVAILABLE))
    r = request()
    r.resume.token_ids.extend(whole[:after])
    r.resume.text = "".join(map(text_of, whole[:after]))
    d = dispatcher(registry)
    out = await collect(d.generate(r, None))

    assert tokens(out) == whole[after:]  # the rest, each token once, across a node failure too
    assert "".join(m.text for m in out) == "".join(map(text_of, whole[after:]))
    assert out[-1].finish_reason == "length"
    first, second = fleet.nodes["n1"].attempts[-1], fleet.nodes["n2"].attempts[-1]
    assert list(first.resume.token_ids) == whole[:after]
    assert list(second.resume.token_ids) == whole[: after + 3]
    # The agents get the point as the attempt's resume, not inside the request.
    assert not first.generate.HasField("resume") and not second.generate.HasField("resume")


async def test_busy_nodes_are_skipped_without_blame(registry: Registry, fleet: FakeFleet) -> None:
    first, _ = healthy(registry, fleet, "n1", "n2")
    fleet.nodes["n1"].busy = True
    out = await collect(dispatcher(registry).generate(request(), None))
    assert {r.node_id for r in out} == {"n2"}
    assert first.failures == 0 and first.state == HEALTHY
    assert first.breaker.consecutive_failures == 0


async def test_request_errors_are_final_and_not_retried(
    registry: Registry, fleet: FakeFleet
) -> None:
    healthy(registry, fleet, "n1", "n2")
    fleet.nodes["n1"].fail_next(Fault(code=grpc.StatusCode.INVALID_ARGUMENT, details="bad stop"))
    d = dispatcher(registry)
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), None))
    assert (caught.value.code, caught.value.message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad stop",
    )
    assert fleet.nodes["n2"].attempts == [] and d.counters.retries_total == 0
    assert registry.nodes["n1"].failures == 0


async def test_attempts_are_bounded_and_the_error_names_each(
    registry: Registry, fleet: FakeFleet
) -> None:
    healthy(registry, fleet, "n1", "n2", "n3")
    for node in fleet.nodes.values():
        node.fail_next(*[Fault(code=grpc.StatusCode.INTERNAL, details="engine failure")] * 3)
    d = dispatcher(registry, max_retries=1)
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), None))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "failed after 2 attempt(s)" in caught.value.message
    assert "[1] n1: INTERNAL engine failure" in caught.value.message
    assert "[2] n3: INTERNAL engine failure" in caught.value.message  # not n1 again
    assert sum(len(n.attempts) for n in fleet.nodes.values()) == 2
    # The request's own max_retries overrides the coordinator's.
    r = request()
    r.max_retries = 0
    with pytest.raises(DispatchError, match=r"after 1 attempt\(s\)"):
        await collect(d.generate(r, None))


async def test_no_healthy_node_waits_then_fails_clearly(
    registry: Registry, clock: VirtualClock
) -> None:
    d = dispatcher(registry, no_node_wait_s=30.0)
    started = clock.now
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), None))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.message == "no healthy nodes available"
    assert clock.now - started == pytest.approx(30.0, abs=0.01)


async def test_no_healthy_node_answers_before_the_callers_deadline(
    registry: Registry, clock: VirtualClock
) -> None:
    d = dispatcher(registry, no_node_wait_s=30.0)
    started = clock.now
    with pytest.raises(DispatchError, match="no healthy nodes"):
        await collect(d.generate(request(), 2.0))
    assert 1.9 <= clock.now - started < 2.0


async def test_a_node_that_becomes_healthy_is_used_at_once(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    fleet.add(FakeNode("n1"))
    node, _ = registry.join(join_request("n1"))
    started = clock.now

    async def later() -> None:
        await asyncio.sleep(3.0)
        registry.report_probe(node, True, False, "health check: SERVING")

    helper = asyncio.create_task(later())
    out = await collect(dispatcher(registry).generate(request(), None))
    await helper
    assert tokens(out) == expected_tokens(PROMPT)
    # Woken by the registry, not by the next backoff poll: within ttft + 16 tokens of 3 s.
    assert clock.now - started == pytest.approx(3.0 + 0.01 * 16, abs=1e-6)


async def test_a_frozen_node_found_unreachable_fails_over_and_resumes(
    registry: Registry, fleet: FakeFleet
) -> None:
    frozen, _ = healthy(registry, fleet, "n1", "n2")
    fleet.nodes["n1"].fail_next(Fault(after_tokens=5, hang=True))
    d = dispatcher(registry)
    task = asyncio.create_task(collect(d.generate(request(), None)))
    await asyncio.sleep(10)  # the stream hangs after 5 tokens: nothing else would end it
    assert fleet.nodes["n1"].tokens_sent == 5 and not task.done()
    registry.report_unreachable(frozen, "health check failed: DEADLINE_EXCEEDED")
    out = await task
    assert tokens(out) == expected_tokens(PROMPT)
    assert [r.node_id for r in out].count("n1") == 5
    assert frozen.failures == 1 and "node lost" in frozen.last_error
    # Already unhealthy when the stream was lost: one incident, not a breaker count.
    assert frozen.breaker.consecutive_failures == 0


async def test_backoff_between_attempts_stays_inside_the_deadline(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    healthy(registry, fleet, "n1", "n2")
    for node in fleet.nodes.values():
        # Busy: not a node failure, so both stay in rotation and are retried with backoff.
        node.busy = True
    d = dispatcher(registry, max_retries=1000)
    started = clock.now
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), 1.5))
    assert clock.now - started <= 1.5 + 1e-6
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    attempts = sum(len(n.attempts) for n in fleet.nodes.values())
    assert 3 <= attempts <= 1000  # backoff spaced them: far fewer than max_retries


async def test_the_callers_deadline_ends_a_slow_stream_without_blame(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    (node,) = healthy(registry, fleet, "n1", itl_s=1.0)
    d = dispatcher(registry)
    started = clock.now
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), 5.0))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert clock.now - started == pytest.approx(5.0, abs=0.011)
    assert node.failures == 0 and node.state == HEALTHY
    assert d.counters.retries_total == 0


async def test_a_client_that_goes_away_stops_the_attempt(
    registry: Registry, fleet: FakeFleet
) -> None:
    (node,) = healthy(registry, fleet, "n1")
    d = dispatcher(registry)
    stream = d.generate(request(), None)
    received = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    assert tokens(received) == expected_tokens(PROMPT)[:3]
    (attempt,) = fleet.nodes["n1"].streams
    assert attempt.cancelled  # the node was told to stop
    assert (node.in_flight, node.failures, node.served) == (0, 0, 0)
    assert (d.counters.in_flight, d.counters.requests_failed, d.counters.requests_cancelled) == (
        0,
        0,
        1,
    )


async def test_a_node_dying_after_the_last_token_is_not_failed_over(
    registry: Registry, fleet: FakeFleet
) -> None:
    healthy(registry, fleet, "n1", "n2")
    # The fault triggers at position 16, past the last token: the stream has finished.
    fleet.nodes["n1"].fail_next(Fault(after_tokens=16))
    out = await collect(dispatcher(registry).generate(request(), None))
    assert tokens(out) == expected_tokens(PROMPT)
    assert fleet.nodes["n2"].attempts == []


async def test_a_stream_that_ends_without_finishing_is_resumed(
    registry: Registry, fleet: FakeFleet
) -> None:
    healthy(registry, fleet, "n1", "n2")
    d = dispatcher(registry)
    # A node asked for 4 tokens ends after them with "length"; a client asking 16 from a node
    # whose stream closes early without a finish_reason must be resumed elsewhere.
    fleet.nodes["n1"].fail_next(Fault(after_tokens=4, end=True))
    out = await collect(d.generate(request(), None))
    assert tokens(out) == expected_tokens(PROMPT)


async def test_repeated_failures_open_the_breaker_and_eject_the_node(
    registry: Registry, fleet: FakeFleet
) -> None:
    flaky, _ = healthy(registry, fleet, "n1", "n2")
    ejected: list[str] = []
    registry.on_ejected.append(lambda n: ejected.append(n.node_id))
    # INTERNAL (engine failure) is a node failure that does not by itself eject the node.
    d = dispatcher(registry, max_retries=1)
    for _ in range(3):
        fleet.nodes["n1"].fail_next(Fault(code=grpc.StatusCode.INTERNAL))
        r = request()
        out = await collect(d.generate(r, None))
        assert tokens(out) == expected_tokens(PROMPT)
    assert ejected == ["n1"] and flaky.state == UNHEALTHY
    assert "circuit breaker open after 3 consecutive failures" in flaky.state_reason


async def test_least_loaded_sends_fewer_requests_to_a_slow_node(
    registry: Registry, fleet: FakeFleet
) -> None:
    # n3 is 5x slower per token; with 9 requests in flight at a time it holds its requests
    # longer, so least_loaded gives it fewer. On virtual time the outcome is exact.
    healthy(registry, fleet, "n1", "n2", itl_s=0.01)
    healthy(registry, fleet, "n3", itl_s=0.05)
    d = Dispatcher(registry, Balancer(registry, LeastLoaded()), 2, metrics=CoordinatorMetrics())
    gate = asyncio.Semaphore(9)

    async def one(i: int) -> str:
        async with gate:
            out = await collect(d.generate(request(f"load {i}", 20), None))
            assert tokens(out) == expected_tokens(f"load {i}", 20)
            return out[-1].node_id

    counts = collections.Counter(await asyncio.gather(*(one(i) for i in range(60))))
    assert sum(counts.values()) == 60
    assert counts["n3"] < 0.5 * min(counts["n1"], counts["n2"])
    # Round robin, by contrast, splits evenly whatever the speed.
    rr = dispatcher(registry)
    served_by = [
        (await collect(rr.generate(request(f"rr {i}", 4), None)))[-1].node_id for i in range(60)
    ]
    even = collections.Counter(served_by)
    assert even == {"n1": 20, "n2": 20, "n3": 20}


async def test_cache_aware_learns_a_nodes_bytes_per_token_from_its_answers(
    registry: Registry, fleet: FakeFleet
) -> None:
    healthy(registry, fleet, "n1")
    strategy = CacheAware()
    d = Dispatcher(registry, Balancer(registry, strategy), 2, metrics=CoordinatorMetrics())
    for i in range(40):
        await collect(d.generate(request(f"tenant {i % 3} system prompt " * 40, 4), None))
    learned = strategy.index.nodes["n1"].bytes_per_token
    # The fake's usage counts 8 bytes a token: the index moved from its 4 toward it.
    assert FAKE_BYTES_PER_TOKEN - 0.2 < learned <= FAKE_BYTES_PER_TOKEN
