"""The coordinator's reliability features, in process on fake nodes and virtual time.

Unrequested aborts, stall detection, blame for a caller's deadline on a silent node,
cancellations counted apart, latency outlier ejection through the dispatcher, flap damping,
forgetting unreachable nodes, node identity (incarnations, impostors) and slow versus missing
health check answers (coordinator/dispatch.py, stalls.py, outliers.py, registry.py,
health.py). Every time asserted is virtual, hence exact where the code is deterministic.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import pytest

from coordinator.balancer import Balancer
from coordinator.circuit import BreakerPolicy
from coordinator.dispatch import Dispatcher, DispatchError
from coordinator.health import HealthMonitor
from coordinator.node_client import IDENTITY_MISMATCH, NodeCallError
from coordinator.outliers import LatencyOutliers
from coordinator.prefix import RequestPrefix
from coordinator.registry import HEALTHY, JOINING, LEFT, UNHEALTHY, Node, Registry
from coordinator.stalls import StallPolicy
from coordinator.strategies import RoundRobin, Strategy
from coordinator.strategies.base import Candidate
from omni_rpc import config
from omni_rpc.metrics import CoordinatorMetrics
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeAttempt, FakeFleet, FakeNode, Fault, expected_tokens, join_request

PROMPT = "the capital of France is"
SERVING = "health check: SERVING"
NOT_SERVING = "health check: NOT_SERVING"


def now() -> float:
    return asyncio.get_running_loop().time()


async def settle() -> None:
    """Let every ready task run, without letting any virtual time pass."""
    start = now()
    for _ in range(20):
        await asyncio.sleep(0)
    assert now() == start


# -- fakes --------------------------------------------------------------------------------------


@dataclass
class Abort:
    """An attempt that ends with finish_reason "abort" nobody asked for, after
    ``after_tokens`` tokens; ``with_token``: the abort message carries the next token."""

    after_tokens: int
    with_token: bool = False


class TimedAttempt(FakeAttempt):
    def __init__(
        self, node: TimedNode, first: node_agent_pb2.AgentRequest, timeout_s: float | None
    ) -> None:
        super().__init__(node, first, timeout_s)
        self.owner = node
        self.abort = node.aborts.popleft() if node.aborts else None

    def cancel(self) -> None:
        if not self.cancelled:
            self.owner.cancelled_at.append(now())
        super().cancel()

    async def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        sent = 0
        inner = super().__aiter__()
        try:
            async for response in inner:
                if self.abort is not None and sent == self.abort.after_tokens:
                    response.finish_reason = "abort"
                    if not self.abort.with_token:
                        response.ClearField("token_ids")
                        response.text = ""
                    yield response
                    return
                self.owner.output_at.append(now())
                yield response
                sent += 1
        finally:
            await inner.aclose()  # type: ignore[attr-defined]


class TimedNode(FakeNode):
    """A fake node that records when its attempts start, produce and are cancelled, can end an
    attempt with an unrequested abort, answer its checks late, or answer them as another
    process (an identity mismatch)."""

    def __init__(self, node_id: str, *, ttft_s: float = 0.01, itl_s: float = 0.01) -> None:
        super().__init__(node_id, ttft_s=ttft_s, itl_s=itl_s)
        self.aborts: deque[Abort] = deque()
        self.started_at: list[float] = []
        self.output_at: list[float] = []
        self.cancelled_at: list[float] = []
        self.check_times: list[float] = []
        self.check_timeouts: list[float] = []
        # Seconds a Check takes to answer (a host under load answers late).
        self.check_delay_s = 0.0
        # Checks fail with this (e.g. FAILED_PRECONDITION) while set.
        self.check_error: NodeCallError | None = None

    def generate(self, first: node_agent_pb2.AgentRequest, timeout_s: float | None) -> TimedAttempt:
        self.attempts.append(first)
        attempt = TimedAttempt(self, first, timeout_s)
        self.streams.append(attempt)
        self.started_at.append(now())
        return attempt

    async def check(self, timeout_s: float) -> str:
        self.check_times.append(now())
        self.check_timeouts.append(timeout_s)
        if self.check_error is not None:
            raise self.check_error
        status = await super().check(timeout_s)
        if self.check_delay_s:
            await asyncio.sleep(self.check_delay_s)
        return status


class FirstById(Strategy):
    """Always the first candidate (node id order): a failover then goes to the next one."""

    name = "first"

    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        return candidates[0]


class TimedOutliers(LatencyOutliers):
    """Latency outliers that remember when each node's samples came in."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, list[float]] = {}

    def record(self, node_id: str, seconds_per_token: float, now: float) -> None:
        self.times.setdefault(node_id, []).append(now)
        super().record(node_id, seconds_per_token, now)


# -- helpers ------------------------------------------------------------------------------------


def add(
    registry: Registry, fleet: FakeFleet, node_id: str, *, serving: bool = True, **pace: float
) -> tuple[Node, TimedNode]:
    fake = TimedNode(node_id, **pace)
    fleet.add(fake)
    node, new = registry.join(join_request(node_id))
    assert new and node.client is fake
    if serving:
        registry.report_probe(node, True, False, SERVING)
        assert node.state == HEALTHY
    return node, fake


def dispatcher(
    registry: Registry,
    *,
    strategy: Strategy | None = None,
    max_retries: int = 2,
    stall_policy: StallPolicy | None = None,
    outliers: LatencyOutliers | None = None,
) -> Dispatcher:
    return Dispatcher(
        registry,
        Balancer(registry, strategy or RoundRobin()),
        max_retries,
        metrics=CoordinatorMetrics(),
        stall_policy=stall_policy,
        outliers=outliers,
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


def detection_time(started: float, last_output: float, bound: float, every: float) -> float:
    """The first scan of the stall watch (every ``every`` s from ``started``) that finds the
    attempt silent for longer than ``bound`` since ``last_output``."""
    k = 1
    while started + k * every - last_output <= bound:
        k += 1
    return started + k * every


MonitorFactory = Callable[[Registry, float, float], HealthMonitor]


@pytest.fixture
async def monitors(clock: VirtualClock) -> AsyncIterator[MonitorFactory]:
    made: list[HealthMonitor] = []

    def make(registry: Registry, interval_s: float, timeout_s: float) -> HealthMonitor:
        monitor = HealthMonitor(registry, interval_s=interval_s, timeout_s=timeout_s)
        made.append(monitor)
        return monitor

    yield make
    tasks = [t for m in made for pair in m._tasks.values() for t in pair]
    # The per-node tasks loop until stopped: one that ended on its own crashed.
    for task in tasks:
        if task.done() and not task.cancelled():
            raise AssertionError(f"{task.get_name()} ended: {task.exception()!r}")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def forgetful(clock: VirtualClock, fleet: FakeFleet) -> AsyncIterator[Registry]:
    reg = Registry(
        fleet,
        BreakerPolicy(threshold=3, base_s=30.0, max_s=300.0),
        readmit_after=2,
        forget_after_s=60.0,
    )
    yield reg
    await reg.close()


def readmissions(registry: Registry) -> list[float]:
    """When each node went from another state to HEALTHY (filled in as it happens)."""
    times: list[float] = []
    last: dict[int, int] = {}

    def changed(node: Node) -> None:
        state = node.state
        if state == HEALTHY and last.get(id(node), JOINING) == UNHEALTHY:
            times.append(now())
        last[id(node)] = state

    registry.on_changed.append(changed)
    return times


def readmit(registry: Registry, node: Node) -> None:
    for _ in range(registry.readmit_after):
        registry.report_probe(node, True, False, SERVING)
    assert node.state == HEALTHY


# -- 1. unrequested abort -----------------------------------------------------------------------


@pytest.mark.parametrize("with_token", [False, True])
async def test_an_unrequested_abort_fails_over_and_resumes_without_showing_abort(
    registry: Registry, fleet: FakeFleet, with_token: bool
) -> None:
    aborting, fake = add(registry, fleet, "n1")
    other, other_fake = add(registry, fleet, "n2")
    fake.aborts.append(Abort(after_tokens=5, with_token=with_token))
    d = dispatcher(registry, strategy=FirstById())
    out = await collect(d.generate(request(), None))

    assert tokens(out) == expected_tokens(PROMPT)  # every token exactly once, in order
    kept = 5 + with_token  # the abort message's own token is kept, not produced again
    assert [r.node_id for r in out] == ["n1"] * kept + ["n2"] * (16 - kept)
    assert [r.finish_reason for r in out if r.finish_reason] == ["length"]
    assert out[-1].finish_reason == "length" and out[-1].usage.completion_tokens == 16
    assert all(not r.HasField("usage") for r in out[:-1])
    (resumed,) = other_fake.attempts
    assert list(resumed.resume.token_ids) == expected_tokens(PROMPT)[:kept]
    assert resumed.attempt == 2
    assert aborting.failures == 1
    assert aborting.last_error == (
        "n1: ABORTED the node aborted the request without being asked (finish_reason abort)"
    )
    # A node-level failure, but not "unreachable": it stays in rotation until the breaker says.
    assert aborting.state == HEALTHY and aborting.consecutive_failures == 1
    assert (aborting.served, other.served, other.failures) == (0, 1, 0)
    c = d.counters
    assert (c.requests_succeeded, c.requests_failed, c.retries_total, c.resumes_total) == (
        1,
        0,
        1,
        1,
    )


async def test_an_abort_on_the_last_attempt_fails_the_call_instead_of_succeeding(
    registry: Registry, fleet: FakeFleet
) -> None:
    node, fake = add(registry, fleet, "n1")
    fake.aborts.append(Abort(after_tokens=3))
    d = dispatcher(registry, max_retries=0)
    received: list[generate_pb2.GenerateResponse] = []
    with pytest.raises(DispatchError) as caught:
        async for response in d.generate(request(), None):
            received.append(response)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "ABORTED the node aborted the request" in caught.value.message
    assert tokens(received) == expected_tokens(PROMPT)[:3]
    assert all(r.finish_reason == "" for r in received)
    assert node.failures == 1
    assert (d.counters.requests_failed, d.counters.requests_succeeded) == (1, 0)


# -- 2. stall detection -------------------------------------------------------------------------


async def test_a_stalled_stream_is_failed_over_within_the_bound_and_resumed(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory
) -> None:
    monitors(registry, 0.5, 0.25)  # its checks pass all along
    stuck, fake = add(registry, fleet, "n1", serving=False)
    other, other_fake = add(registry, fleet, "n2", serving=False)
    await settle()
    assert stuck.state == other.state == HEALTHY
    fake.fail_next(Fault(after_tokens=5, hang=True))
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=2.0))
    every = d.stalls.scan_every_s
    assert every == 0.5
    started = now()
    out = await collect(d.generate(request(), None))

    assert tokens(out) == expected_tokens(PROMPT)
    assert [r.node_id for r in out] == ["n1"] * 5 + ["n2"] * 11
    last_output = fake.output_at[-1]
    assert last_output == pytest.approx(started + 0.05)
    (stopped,) = fake.cancelled_at
    assert 2.0 < stopped - last_output <= 2.0 + every
    assert stopped == pytest.approx(detection_time(started, last_output, 2.0, every))
    (resumed_at,) = other_fake.started_at
    assert stopped <= resumed_at <= stopped + config.RETRY_BACKOFF_BASE_S
    (resumed,) = other_fake.attempts
    assert list(resumed.resume.token_ids) == expected_tokens(PROMPT)[:5]
    assert stuck.failures == 1
    assert stuck.last_error.startswith("n1: UNAVAILABLE stalled: no output for ")
    assert stuck.last_error.endswith("s waiting for more output (bound 2.0s)")
    assert stuck.consecutive_failures == 1
    assert d.counters.resumes_total == 1 and d.counters.requests_succeeded == 1
    # The node answered its health checks throughout (the stall asked for one at once).
    assert stuck.state == HEALTHY and stuck.suspect is False
    assert stopped in fake.check_times


async def test_repeated_stalls_open_the_breaker(registry: Registry, fleet: FakeFleet) -> None:
    stuck, fake = add(registry, fleet, "n1")
    add(registry, fleet, "n2")
    fake.fail_next(*[Fault(after_tokens=2, hang=True)] * 3)
    ejected: list[str] = []
    registry.on_ejected.append(lambda n: ejected.append(n.node_id))
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=2.0))
    for _ in range(3):
        out = await collect(d.generate(request(), None))
        assert tokens(out) == expected_tokens(PROMPT)
    assert ejected == ["n1"]
    assert stuck.state == UNHEALTHY and stuck.failures == 3
    assert stuck.state_reason.startswith(
        "circuit breaker open after 3 consecutive failures (ejection #1, 30s): "
        "n1: UNAVAILABLE stalled: no output for "
    )
    assert stuck.state_reason.endswith("waiting for more output (bound 2.0s)")
    # Out of rotation: the next call goes straight to n2.
    out = await collect(d.generate(request(), None))
    assert {r.node_id for r in out} == {"n2"}
    assert len(fake.attempts) == 3


@pytest.mark.parametrize(
    ("prompt_tokens", "usual_first_s", "bound"),
    [(1, 0.0, 2.002), (600, 0.0, 3.2), (600, 1.0, 5.2), (1, 0.3, 2.002)],
)
async def test_before_the_first_output_the_bound_adds_prefill_time_per_prompt_token(
    registry: Registry,
    fleet: FakeFleet,
    prompt_tokens: int,
    usual_first_s: float,
    bound: float,
) -> None:
    stuck, fake = add(registry, fleet, "n1")
    add(registry, fleet, "n2")
    stuck.usual_first_output_s = usual_first_s  # the bound: max(floor, 4 x usual) + prefill
    fake.fail_next(Fault(after_tokens=0, hang=True))
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=2.0))
    r = request()
    r.prompt_token_ids.extend(range(prompt_tokens))
    started = now()
    out = await collect(d.generate(r, None))
    assert tokens(out) == expected_tokens(PROMPT)
    assert fake.output_at == []
    (stopped,) = fake.cancelled_at
    every = d.stalls.scan_every_s
    assert bound < stopped - started <= bound + every
    assert stopped == pytest.approx(detection_time(started, started, bound, every))
    assert stuck.last_error.endswith(f"waiting for its first output (bound {bound:.1f}s)")
    assert stuck.failures == 1


@pytest.mark.parametrize(("usual_gap_s", "bound"), [(0.2, 2.0), (1.0, 4.0), (2.5, 10.0)])
async def test_a_node_with_a_learnt_usual_gap_gets_factor_times_it_as_bound(
    registry: Registry, fleet: FakeFleet, usual_gap_s: float, bound: float
) -> None:
    stuck, fake = add(registry, fleet, "n1")
    add(registry, fleet, "n2")
    stuck.usual_gap_s = usual_gap_s  # bound: max(2.0, 4 x usual gap)
    fake.fail_next(Fault(after_tokens=5, hang=True))
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=2.0))
    started = now()
    out = await collect(d.generate(request(), None))
    assert tokens(out) == expected_tokens(PROMPT)
    last_output = fake.output_at[-1]
    (stopped,) = fake.cancelled_at
    every = d.stalls.scan_every_s
    assert bound < stopped - last_output <= bound + every
    assert stopped == pytest.approx(detection_time(started, last_output, bound, every))
    assert stuck.last_error.endswith(f"waiting for more output (bound {bound:.1f}s)")


async def test_successful_attempts_teach_the_node_its_usual_times(
    registry: Registry, fleet: FakeFleet
) -> None:
    node, _ = add(registry, fleet, "n1", ttft_s=0.5, itl_s=0.1)
    d = dispatcher(registry)
    await collect(d.generate(request(), None))
    assert node.usual_first_output_s == pytest.approx(0.5)
    assert node.usual_gap_s == pytest.approx(0.1)
    await collect(d.generate(request(), None))  # the same again: the EWMA does not move
    assert node.usual_first_output_s == pytest.approx(0.5)
    assert node.usual_gap_s == pytest.approx(0.1)


async def test_stall_detection_off_a_hang_lasts_until_the_callers_deadline(
    registry: Registry, fleet: FakeFleet
) -> None:
    stuck, fake = add(registry, fleet, "n1")
    _, other_fake = add(registry, fleet, "n2")
    fake.fail_next(Fault(after_tokens=5, hang=True))
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=0))
    assert not d.stalls.policy.enabled
    started = now()
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), 60.0))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert now() - started == pytest.approx(60.0)
    assert other_fake.attempts == []  # never failed over
    assert fake.tokens_sent == 5
    # Silent for 60 s when the caller gave up: that is held against the node.
    assert stuck.failures == 1
    assert (d.counters.requests_cancelled, d.counters.requests_failed) == (1, 0)


# -- 3. caller's deadline while the node is silent ----------------------------------------------


async def test_a_callers_deadline_on_a_silent_node_counts_against_the_node(
    registry: Registry, fleet: FakeFleet
) -> None:
    stuck, fake = add(registry, fleet, "n1")
    _, other_fake = add(registry, fleet, "n2")
    fake.fail_next(Fault(after_tokens=3, hang=True))
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=5.0))
    started = now()
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), 3.0))  # shorter than the 5 s stall bound
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.caller_deadline
    assert now() - started == pytest.approx(3.0)
    assert other_fake.attempts == []
    assert stuck.failures == 1
    assert stuck.last_error == (
        "n1: the caller's deadline expired after 3.0s without output from the node"
    )
    assert stuck.state == HEALTHY and stuck.consecutive_failures == 1
    c = d.counters
    assert (c.requests_cancelled, c.requests_failed, c.requests_succeeded) == (1, 0, 0)
    assert c.in_flight == 0 and stuck.in_flight == 0


async def test_a_callers_deadline_on_a_steadily_producing_node_is_not_its_fault(
    registry: Registry, fleet: FakeFleet
) -> None:
    node, fake = add(registry, fleet, "n1", itl_s=0.5)
    d = dispatcher(registry, stall_policy=StallPolicy(timeout_s=5.0))
    started = now()
    with pytest.raises(DispatchError) as caught:
        await collect(d.generate(request(), 3.0))
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert now() - started == pytest.approx(3.0)
    assert fake.tokens_sent == 6  # 0.01, 0.51, ..., 2.51
    assert node.failures == 0 and node.consecutive_failures == 0 and node.last_error == ""
    assert (d.counters.requests_cancelled, d.counters.requests_failed) == (1, 0)


# -- 4. cancellations ---------------------------------------------------------------------------


async def test_a_client_going_away_is_counted_as_cancelled_not_failed(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    node, fake = add(registry, fleet, "n1", itl_s=1.0)
    d = dispatcher(registry, max_retries=0)
    fake.fail_next(Fault(code=grpc.StatusCode.INTERNAL, details="engine failure"))
    with pytest.raises(DispatchError):
        await collect(d.generate(request(), None))
    assert (d.counters.requests_failed, d.counters.requests_cancelled) == (1, 0)

    # The client closes its stream mid-way.
    stream = d.generate(request(), None)
    received = [await anext(stream) for _ in range(3)]
    await stream.aclose()
    assert tokens(received) == expected_tokens(PROMPT)[:3]
    assert (d.counters.requests_failed, d.counters.requests_cancelled) == (1, 1)

    # The caller's task is cancelled mid-way.
    task = asyncio.create_task(collect(d.generate(request(), None)))
    await clock.advance(2.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    c = d.counters
    assert (c.requests_total, c.requests_succeeded, c.requests_failed) == (3, 0, 1)
    assert (c.requests_cancelled, c.in_flight, c.retries_total) == (2, 0, 0)
    assert node.failures == 1 and node.in_flight == 0  # only the engine failure
    assert all(a.cancelled for a in fake.streams)  # the node was told to stop each time


# -- 5. latency outliers ------------------------------------------------------------------------


async def run_requests_for(d: Dispatcher, seconds: float, tokens_each: int = 4) -> None:
    until = now() + seconds
    i = 0
    while now() < until:
        prompt = f"request {i}"
        out = await collect(d.generate(request(prompt, tokens_each), None))
        assert tokens(out) == expected_tokens(prompt, tokens_each)
        i += 1


async def test_a_much_slower_node_is_ejected_as_a_latency_outlier(
    registry: Registry, fleet: FakeFleet
) -> None:
    # With ttft == itl, a node's latency per output token is exactly its pace.
    nodes = [add(registry, fleet, f"n{i}", ttft_s=0.01, itl_s=0.01)[0] for i in (1, 2, 3)]
    slow, _ = add(registry, fleet, "n4", ttft_s=0.2, itl_s=0.2)
    outliers = TimedOutliers()
    d = dispatcher(registry, outliers=outliers)
    ejected: list[tuple[float, str]] = []
    registry.on_ejected.append(lambda n: ejected.append((now(), n.node_id)))
    await run_requests_for(d, 30.0)

    assert [node_id for _, node_id in ejected] == ["n4"]
    assert slow.state == UNHEALTHY
    assert slow.state_reason.startswith("latency outlier (ejection #1, 30s): ")
    assert slow.state_reason.endswith(": 200.0 ms per output token, its peers' median 10.0 ms")
    assert slow.failures == 0  # an ejection, not failures
    # Judged at the first evaluation once every node had its min_samples, an interval apart.
    ready = max(times[config.OUTLIER_MIN_SAMPLES - 1] for times in outliers.times.values())
    (when, _) = ejected[0]
    assert ready <= when <= ready + config.OUTLIER_INTERVAL_S + d.stalls.scan_every_s
    assert all(n.state == HEALTHY for n in nodes)
    assert sum(n.state == UNHEALTHY for n in registry.nodes.values()) <= len(registry.nodes) // 2


async def test_a_node_slow_to_its_first_token_but_decoding_at_pace_is_not_an_outlier(
    registry: Registry, fleet: FakeFleet
) -> None:
    # n4 computes the long uncached prompts (with prefix caching, or cache_aware routing,
    # its peers find theirs cached): 50x their time to the first token, the same decode pace.
    nodes = [add(registry, fleet, f"n{i}", ttft_s=0.01, itl_s=0.01)[0] for i in (1, 2, 3)]
    cold, _ = add(registry, fleet, "n4", ttft_s=0.5, itl_s=0.01)
    outliers = TimedOutliers()
    d = dispatcher(registry, outliers=outliers)
    ejected: list[str] = []
    registry.on_ejected.append(lambda n: ejected.append(n.node_id))
    await run_requests_for(d, 30.0)
    assert all(len(times) >= config.OUTLIER_MIN_SAMPLES for times in outliers.times.values())
    assert ejected == []
    assert all(n.state == HEALTHY for n in [*nodes, cold])


async def test_outlier_ejection_never_takes_out_more_than_half_the_nodes(
    registry: Registry, fleet: FakeFleet
) -> None:
    fast, _ = add(registry, fleet, "n1", ttft_s=0.01, itl_s=0.01)
    later_slow, later_slow_fake = add(registry, fleet, "n2", ttft_s=0.01, itl_s=0.01)
    add(registry, fleet, "n3", ttft_s=0.2, itl_s=0.2)
    add(registry, fleet, "n4", ttft_s=0.3, itl_s=0.3)
    outliers = TimedOutliers()
    d = dispatcher(registry, outliers=outliers)
    ejected: list[str] = []
    registry.on_ejected.append(lambda n: ejected.append(n.node_id))
    await run_requests_for(d, 30.0)
    assert sorted(ejected) == ["n3", "n4"]
    # n2 turns 20x slower than n1: an outlier by the numbers, but ejecting it would leave
    # fewer than half the nodes in.
    later_slow_fake.ttft_s = later_slow_fake.itl_s = 0.2
    await run_requests_for(d, 60.0)
    assert sorted(ejected) == ["n3", "n4"]
    assert fast.state == later_slow.state == HEALTHY
    assert outliers.outliers(["n1", "n2"], now()) == ["n2"]


# -- 6. flap damping ----------------------------------------------------------------------------


async def test_a_node_relapsing_soon_after_readmission_is_held_out_for_a_doubling_time(
    registry: Registry, clock: VirtualClock
) -> None:
    node, _ = registry.join(join_request("n1"))
    registry.report_probe(node, True, False, SERVING)
    # The first failure after joining is no flap.
    registry.report_probe(node, False, False, NOT_SERVING)
    assert node.state == UNHEALTHY and node.state_reason == NOT_SERVING
    assert (node.flaps, node.held_until) == (0, 0.0)
    readmit(registry, node)
    assert node.readmitted_at == now()
    for flap in range(1, 9):
        await clock.advance(1.0)
        registry.report_probe(node, False, False, NOT_SERVING)
        hold = min(config.FLAP_MAX_HOLD_S, config.FLAP_BASE_HOLD_S * 2 ** (flap - 1))
        assert hold == [2, 4, 8, 16, 32, 64, 120, 120][flap - 1]
        assert node.state == UNHEALTHY and node.flaps == flap
        assert node.held_until == now() + hold
        assert node.state_reason == (
            f"{NOT_SERVING} (flapping: relapse #{flap} within 1.0s of re-admission, "
            f"held out {hold:g}s)"
        )
        # Passing probes do not count while it is held out...
        await clock.advance(hold - 0.01)
        for _ in range(3):
            registry.report_probe(node, True, False, SERVING)
        assert node.state == UNHEALTHY and node.good_probes == 0
        assert registry.dispatchable() == ()
        # ... and re-admit it once the hold is over.
        await clock.advance(0.02)
        registry.report_probe(node, True, False, SERVING)
        assert node.state == UNHEALTHY and node.good_probes == 1
        registry.report_probe(node, True, False, SERVING)
        assert node.state == HEALTHY and registry.dispatchable() == (node,)


async def test_a_lost_connection_soon_after_readmission_is_a_flap_too(
    registry: Registry, clock: VirtualClock
) -> None:
    node, _ = registry.join(join_request("n1"))
    registry.report_probe(node, True, False, SERVING)
    registry.report_unreachable(node, "health watch stream broke: UNAVAILABLE")
    readmit(registry, node)
    await clock.advance(3.0)
    registry.report_unreachable(node, "health check failed: DEADLINE_EXCEEDED")
    assert node.flaps == 1 and node.held_until == now() + config.FLAP_BASE_HOLD_S
    assert node.state_reason == (
        "health check failed: DEADLINE_EXCEEDED (flapping: relapse #1 within 3.0s of "
        "re-admission, held out 2s)"
    )


async def test_flaps_are_counted_only_within_the_window_and_forgiven_after_a_long_uptime(
    registry: Registry, clock: VirtualClock
) -> None:
    node, _ = registry.join(join_request("n1"))
    registry.report_probe(node, True, False, SERVING)
    registry.report_probe(node, False, False, NOT_SERVING)
    readmit(registry, node)
    for flap in (1, 2):
        await clock.advance(1.0)
        registry.report_probe(node, False, False, NOT_SERVING)
        assert node.flaps == flap
        await clock.advance(node.held_until - now() + 0.01)
        readmit(registry, node)
    # Up longer than the window but not the forgiveness time: no flap, and no hold, but the
    # count is kept.
    await clock.advance(config.FLAP_WINDOW_S + 5.0)
    registry.report_probe(node, False, False, NOT_SERVING)
    assert node.state_reason == NOT_SERVING
    assert node.flaps == 2 and node.held_until < now()
    readmit(registry, node)  # at once
    await clock.advance(1.0)
    registry.report_probe(node, False, False, NOT_SERVING)
    assert node.flaps == 3 and node.held_until == now() + 8.0
    await clock.advance(8.01)
    readmit(registry, node)
    # Up for the forgiveness time: the count starts over.
    await clock.advance(config.FLAP_FORGIVE_S + 0.01)
    registry.report_probe(node, False, False, NOT_SERVING)
    assert node.flaps == 0 and node.state_reason == NOT_SERVING
    readmit(registry, node)
    await clock.advance(1.0)
    registry.report_probe(node, False, False, NOT_SERVING)
    assert node.flaps == 1 and node.held_until == now() + config.FLAP_BASE_HOLD_S


async def flapping_readmissions(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory, seconds: float
) -> tuple[list[float], Node]:
    """Run a node frozen 1 s out of every 1.5 s under a monitor (interval 0.2, timeout 0.1)
    for ``seconds``; return the times it was re-admitted.

    (With interval 0.5 and timeout 0.25 the 0.5 s up-windows fit only one passing probe once
    the re-probe backoff has grown, so the node is hardly ever re-admitted, damped or not.)"""
    monitors(registry, 0.2, 0.1)
    times = readmissions(registry)
    node, fake = add(registry, fleet, "n1", serving=False)
    await settle()
    assert node.state == HEALTHY
    until = now() + seconds
    while now() < until:
        fake.freeze()
        await asyncio.sleep(1.0)
        fake.revive()
        await asyncio.sleep(0.5)
    return times, node


async def test_flap_damping_keeps_a_flapping_node_out_under_the_health_monitor(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory
) -> None:
    times, node = await flapping_readmissions(registry, fleet, monitors, 30.0)
    assert 2 <= len(times) <= 5
    assert node.flaps >= len(times) - 1
    # Each re-admission after a flap waited out a hold that doubles: 2 s, 4 s, 8 s...
    for n, (a, b) in enumerate(itertools.pairwise(times), start=1):
        assert b - a >= config.FLAP_BASE_HOLD_S * 2 ** (n - 1)


async def test_without_flap_damping_the_same_node_is_readmitted_about_every_cycle(
    registry: Registry,
    fleet: FakeFleet,
    monitors: MonitorFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config, "FLAP_WINDOW_S", 0.0)  # no relapse counts as a flap
    times, node = await flapping_readmissions(registry, fleet, monitors, 30.0)
    assert len(times) >= 15  # about once per 1.5 s cycle
    assert node.flaps == 0


# -- 7. forgetting unreachable nodes ------------------------------------------------------------


async def test_a_node_unreachable_for_forget_after_is_forgotten(
    forgetful: Registry, clock: VirtualClock
) -> None:
    removed: list[Node] = []
    forgetful.on_removed.append(removed.append)
    node, _ = forgetful.join(join_request("n1"))
    forgetful.report_probe(node, True, False, SERVING)
    lost: list[str] = []
    node.lost_hooks.add(lost.append)
    started = now()
    forgetful.report_unreachable(node, "health watch stream broke: UNAVAILABLE")
    assert node.unreachable_since == started
    for _ in range(5):
        await clock.advance(11.9)
        forgetful.report_unreachable(node, "health check failed: UNAVAILABLE")
        assert forgetful.nodes == {"n1": node}
    await clock.advance(started + 60.001 - now())
    forgetful.report_unreachable(node, "health check failed: UNAVAILABLE")
    assert forgetful.nodes == {}
    assert removed == [node]
    assert node.state == LEFT
    assert node.state_reason == (
        "forgotten: unreachable for 60s (health check failed: UNAVAILABLE)"
    )
    assert lost[-1] == f"node removed: {node.state_reason}"


async def test_an_answer_resets_the_forget_clock(forgetful: Registry, clock: VirtualClock) -> None:
    node, _ = forgetful.join(join_request("n1"))
    forgetful.report_probe(node, True, False, SERVING)
    forgetful.report_unreachable(node, "gone")
    await clock.advance(50.0)
    forgetful.report_probe(node, False, False, NOT_SERVING)  # answers (not serving)
    assert node.unreachable_since is None
    await clock.advance(20.0)
    forgetful.report_unreachable(node, "gone")
    await clock.advance(30.0)
    forgetful.report_watch(node, True, "health watch: SERVING")  # the watch counts too
    await clock.advance(10.0)
    forgetful.report_unreachable(node, "gone")
    restarted = now()
    await clock.advance(59.0)
    forgetful.report_unreachable(node, "gone")
    assert forgetful.nodes == {"n1": node}
    await clock.advance(restarted + 60.001 - now())
    forgetful.report_unreachable(node, "gone")
    assert forgetful.nodes == {}


async def test_forget_after_zero_never_forgets(fleet: FakeFleet, clock: VirtualClock) -> None:
    keeping = Registry(fleet, forget_after_s=0)
    try:
        node, _ = keeping.join(join_request("n1"))
        for _ in range(10):
            keeping.report_unreachable(node, "gone")
            await clock.advance(1000.0)
        keeping.report_unreachable(node, "gone")
        assert keeping.nodes == {"n1": node} and node.state == UNHEALTHY
    finally:
        await keeping.close()


async def test_the_health_monitor_forgets_a_dead_node_after_forget_after(
    forgetful: Registry, fleet: FakeFleet, monitors: MonitorFactory, clock: VirtualClock
) -> None:
    monitor = monitors(forgetful, 5.0, 1.0)
    node, fake = add(forgetful, fleet, "n1", serving=False)
    other, _ = add(forgetful, fleet, "n2", serving=False)
    await settle()
    await clock.advance(3.0)
    # Dead for 40 s, then back: the clock starts over.
    fake.kill()
    await clock.advance(40.0)
    assert node.state == UNHEALTHY and node.unreachable_since is not None
    fake.revive()
    await clock.advance(15.0)
    assert node.state == HEALTHY and node.unreachable_since is None
    fake.kill()
    killed_at = now()
    await settle()
    assert node.unreachable_since == killed_at
    removed_at: list[float] = []
    forgetful.on_removed.append(lambda n: removed_at.append(now()))
    await clock.advance(59.9)
    assert forgetful.nodes == {"n1": node, "n2": other}
    await clock.advance(5.2)  # reports come at least every interval
    assert forgetful.nodes == {"n2": other}
    assert node.state == LEFT and node.state_reason.startswith("forgotten: unreachable for 6")
    (when,) = removed_at
    assert killed_at + 60.0 <= when <= killed_at + 60.0 + 5.0
    assert id(node) not in monitor._tasks  # no longer probed
    checks = fake.checks
    await clock.advance(30.0)
    assert fake.checks == checks


# -- 8. identity --------------------------------------------------------------------------------


async def test_a_new_incarnation_at_the_same_address_replaces_the_node(
    registry: Registry, fleet: FakeFleet
) -> None:
    added: list[Node] = []
    removed: list[Node] = []
    registry.on_added.append(added.append)
    registry.on_removed.append(removed.append)
    first = join_request("n1")
    first.incarnation = "boot-1"
    old, new = registry.join(first)
    assert new
    registry.report_probe(old, True, False, SERVING)
    lost: list[str] = []
    old.lost_hooks.add(lost.append)
    old_client = fleet.nodes.pop("n1")  # the connector makes a new client for the new process

    # The same incarnation: a refresh in place.
    same = join_request("n1", capacity=8)
    same.incarnation = "boot-1"
    node, new = registry.join(same)
    assert not new and node is old and node.capacity == 8 and node.state == HEALTHY
    assert lost == [] and removed == []

    restarted = join_request("n1")
    restarted.incarnation = "boot-2"
    node, new = registry.join(restarted)
    assert new and node is not old
    assert registry.nodes == {"n1": node}
    assert node.address == old.address and node.info.incarnation == "boot-2"
    assert node.state == JOINING
    assert old.state == LEFT
    assert old.state_reason == "replaced by its restarted agent (a new incarnation)"
    assert lost == ["node removed: replaced by its restarted agent (a new incarnation)"]
    assert removed == [old] and added == [old, node]
    await asyncio.sleep(0)  # the old client is closed in a task
    assert old_client.closed and node.client is not old_client


async def test_report_impostor_removes_the_node(registry: Registry, fleet: FakeFleet) -> None:
    node, _ = add(registry, fleet, "n1")
    lost: list[str] = []
    node.lost_hooks.add(lost.append)
    registry.report_impostor(node, "node identity mismatch: this is n7")
    assert registry.nodes == {}
    assert node.state == LEFT
    assert node.state_reason == (
        "gone: a different process answers at its address: node identity mismatch: this is n7"
    )
    assert lost == [f"node removed: {node.state_reason}"]
    assert registry.dispatchable() == ()


async def test_a_check_answered_by_another_process_removes_the_node(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory, clock: VirtualClock
) -> None:
    monitor = monitors(registry, 5.0, 1.0)
    node, fake = add(registry, fleet, "n1", serving=False)
    joined = now()
    await settle()
    assert node.state == HEALTHY
    await clock.advance(2.0)
    details = IDENTITY_MISMATCH + "this process is n1 incarnation boot-2, not boot-1"
    fake.check_error = NodeCallError(grpc.StatusCode.FAILED_PRECONDITION, details)
    await clock.advance(3.01)  # past the next check, at joined + interval
    assert fake.check_times == [joined, joined + 5.0]
    assert registry.nodes == {}
    assert node.state == LEFT
    assert "different process" in node.state_reason
    assert node.state_reason == f"gone: a different process answers at its address: {details}"
    assert id(node) not in monitor._tasks
    await clock.advance(30.0)
    assert len(fake.check_times) == 2  # no longer checked


async def test_another_failed_precondition_is_not_an_impostor(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory, clock: VirtualClock
) -> None:
    monitors(registry, 5.0, 1.0)
    node, fake = add(registry, fleet, "n1", serving=False)
    await settle()
    await clock.advance(2.0)
    fake.check_error = NodeCallError(grpc.StatusCode.FAILED_PRECONDITION, "engine not loaded")
    await clock.advance(3.01)
    assert registry.nodes == {"n1": node}
    assert node.state == UNHEALTHY
    assert node.state_reason == "health check failed: FAILED_PRECONDITION engine not loaded"
    fake.check_error = None
    await clock.advance(10.0)
    assert node.state == HEALTHY


# -- 9. slow answer versus no answer ------------------------------------------------------------


async def test_a_slow_check_answer_holds_new_work_but_never_ejects(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory, clock: VirtualClock
) -> None:
    timeout = 1.0
    monitors(registry, 5.0, timeout)
    states: list[int] = []
    registry.on_changed.append(lambda n: states.append(n.state))
    node, fake = add(registry, fleet, "n1", serving=False)
    joined = now()
    await settle()
    assert node.state == HEALTHY
    lost: list[str] = []
    node.lost_hooks.add(lost.append)
    fake.check_delay_s = 1.5 * timeout
    assert fake.check_delay_s < config.PROBE_CONFIRM_TIMEOUTS * timeout
    d = dispatcher(registry)

    await clock.advance(5.0 + timeout - 0.01)  # the second check began at joined + 5
    assert fake.check_times[-1] == joined + 5.0
    assert registry.dispatchable() == (node,) and not node.suspect
    await clock.advance(0.02)
    assert node.suspect and node.state == HEALTHY
    assert registry.dispatchable() == () and registry.capacity == 0
    # A call arriving now waits for the answer, not for a probe backoff.
    call = asyncio.create_task(collect(d.generate(request(), None)))
    await clock.advance(0.48)
    assert node.suspect and fake.attempts == []
    await clock.advance(0.02)
    answered = joined + 5.0 + 1.5 * timeout
    assert not node.suspect and registry.dispatchable() == (node,)
    assert node.health_check_latency_ms == pytest.approx(1500.0)
    out = await call
    assert tokens(out) == expected_tokens(PROMPT)
    assert fake.started_at == [pytest.approx(answered)]
    # Slow answers for a minute: never unhealthy, no stream lost.
    await clock.advance(60.0)
    assert UNHEALTHY not in states and node.state == HEALTHY
    assert lost == []
    assert fake.check_timeouts == [timeout * config.PROBE_CONFIRM_TIMEOUTS] * len(
        fake.check_timeouts
    )


async def test_a_check_that_never_answers_ejects_at_confirm_timeouts(
    registry: Registry, fleet: FakeFleet, monitors: MonitorFactory, clock: VirtualClock
) -> None:
    timeout = 1.0
    monitors(registry, 5.0, timeout)
    node, fake = add(registry, fleet, "n1", serving=False)
    joined = now()
    await settle()
    lost: list[float] = []
    node.lost_hooks.add(lambda reason: lost.append(now()))
    await clock.advance(2.0)
    fake.freeze()
    began = joined + 5.0
    await clock.advance(began + timeout + 0.01 - now())
    assert fake.check_times[-1] == began
    assert node.suspect and node.state == HEALTHY and registry.dispatchable() == ()
    assert lost == []  # only suspect so far: its streams go on
    await clock.advance(began + config.PROBE_CONFIRM_TIMEOUTS * timeout - 0.01 - now())
    assert node.state == HEALTHY and node.suspect
    await clock.advance(0.02)
    assert node.state == UNHEALTHY and not node.suspect
    assert node.state_reason == "health check failed: DEADLINE_EXCEEDED deadline exceeded"
    assert lost == [pytest.approx(began + config.PROBE_CONFIRM_TIMEOUTS * timeout)]


# -- found by these tests, fixed -------------------------------------------------------------------


async def test_a_client_that_pauses_reading_does_not_make_the_node_look_stalled(
    registry: Registry, fleet: FakeFleet, clock: VirtualClock
) -> None:
    node, _ = add(registry, fleet, "n1")
    add(registry, fleet, "n2")
    d = dispatcher(registry, strategy=FirstById(), stall_policy=StallPolicy(timeout_s=2.0))
    stream = d.generate(request(), None)
    received = [await anext(stream) for _ in range(3)]
    await clock.advance(5.0)  # the client is busy elsewhere: backpressure, not a stall
    received += [response async for response in stream]
    assert tokens(received) == expected_tokens(PROMPT)
    assert node.failures == 0
    assert {r.node_id for r in received} == {"n1"}


async def test_a_relapse_first_seen_by_a_request_is_a_flap_too(
    registry: Registry, clock: VirtualClock
) -> None:
    node, _ = registry.join(join_request("n1"))
    registry.report_probe(node, True, False, SERVING)
    registry.report_probe(node, False, False, NOT_SERVING)
    readmit(registry, node)
    await clock.advance(1.0)
    registry.record_failure(node, "n1: UNAVAILABLE connection reset", unreachable=True)
    registry.report_unreachable(node, "health watch stream broke: UNAVAILABLE")
    assert node.flaps == 1
    assert node.held_until == now() + config.FLAP_BASE_HOLD_S


async def test_a_callers_deadline_during_a_long_prefill_is_not_the_nodes_fault(
    registry: Registry, fleet: FakeFleet
) -> None:
    node, fake = add(registry, fleet, "n1")
    fake.fail_next(Fault(after_tokens=0, hang=True))  # prefilling, as far as anyone can tell
    d = dispatcher(registry, stall_policy=StallPolicy(timeout_s=2.0))
    r = request()
    r.prompt_token_ids.extend(range(5000))  # stall bound before the first output: 2 + 10 s
    with pytest.raises(DispatchError):
        await collect(d.generate(r, 3.0))
    assert node.failures == 0


async def test_a_replaced_node_is_not_judged_on_its_predecessors_latency(
    registry: Registry, fleet: FakeFleet
) -> None:
    add(registry, fleet, "n1")
    add(registry, fleet, "n2")
    outliers = TimedOutliers()
    d = dispatcher(registry, outliers=outliers)
    for i in range(10):
        await collect(d.generate(request(f"r{i}", 4), None))
    assert outliers.typical("n1", now()) is not None
    old = registry.nodes["n1"]
    fleet.nodes.pop("n1")
    restarted = join_request("n1")
    restarted.incarnation = "boot-2"
    node, new = registry.join(restarted)
    assert new and node is not old
    assert outliers.typical("n1", now()) is None
