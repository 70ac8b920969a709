"""Failure detection by the health monitor (coordinator/health.py) on fake nodes and virtual time.

The bounds asserted here are the ones operators rely on, with interval_s=5 and timeout_s=1
(a Check fails after PROBE_CONFIRM_TIMEOUTS timeouts, DEADLINE below; past one timeout the node
only stops getting new work):

* a status change pushed by the agent (NOT_SERVING) is seen at once, through the Watch stream;
* a dead process (connection reset) is seen at once, through the broken Watch stream;
* a frozen process (socket open, nothing answers) is seen by the next Check's deadline, so
  within interval_s + DEADLINE of freezing;
* an unhealthy node is re-probed with backoff (DEADLINE + min(interval_s, base * 2**i) between
  probes of a frozen node) and re-admitted by the readmit_after-th passing probe.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import pytest

from coordinator.health import HealthMonitor
from coordinator.registry import DRAINING, HEALTHY, JOINING, UNHEALTHY, Node, Registry
from omni_rpc import config
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeFleet, FakeNode, join_request

INTERVAL = 5.0
TIMEOUT = 1.0
# A Check that gets no answer fails this long after it started (a late answer, up to then, is
# only "slow").
DEADLINE = TIMEOUT * config.PROBE_CONFIRM_TIMEOUTS
# Resolution of the polls that find when a transition happened (virtual seconds).
STEP = 0.01
# Between the first failing checks of an incident: the deadline plus 0.1 s, 0.2 s, 0.4 s.
QUICK_GAPS = [round(DEADLINE + config.PROBE_BACKOFF_BASE_S * 2**i, 6) for i in range(3)]


class TimedNode(FakeNode):
    """A fake node that records when each health Check started (virtual time)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.check_times: list[float] = []

    async def check(self, timeout_s: float) -> str:
        assert timeout_s == DEADLINE
        self.check_times.append(asyncio.get_running_loop().time())
        return await super().check(timeout_s)


@pytest.fixture
async def monitor(registry: Registry, clock: VirtualClock) -> AsyncIterator[HealthMonitor]:
    mon = HealthMonitor(registry, interval_s=INTERVAL, timeout_s=TIMEOUT)
    yield mon
    tasks = [t for pair in mon._tasks.values() for t in pair]
    # The per-node tasks loop until stopped: one that ended on its own crashed.
    for task in tasks:
        if task.done() and not task.cancelled():
            raise AssertionError(f"{task.get_name()} ended: {task.exception()!r}")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def now() -> float:
    return asyncio.get_running_loop().time()


async def settle() -> None:
    """Let every ready task run, without letting any virtual time pass."""
    start = now()
    for _ in range(20):
        await asyncio.sleep(0)
    assert now() == start


async def join(registry: Registry, fleet: FakeFleet, node_id: str = "n1") -> tuple[Node, TimedNode]:
    fake = TimedNode(node_id)
    fleet.add(fake)
    node, new = registry.join(join_request(node_id))
    assert new and node.client is fake
    await settle()
    return node, fake


Transitions = list[tuple[float, str, int]]


@pytest.fixture
def transitions(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Transitions:
    """Every state change, with the exact virtual time it happened at."""
    changes: Transitions = []
    original = registry._transition

    def record(node: Node, reason: str, change: Callable[[], object]) -> None:
        before = node.state
        original(node, reason, change)
        if node.state != before:
            changes.append((now(), node.node_id, node.state))

    monkeypatch.setattr(registry, "_transition", record)
    return changes


async def reach(transitions: Transitions, node: Node, state: int, limit_s: float) -> float:
    """Wait (polling every STEP) until ``node`` is in ``state``; return the exact virtual time
    it got there. Fails if it is not there ``limit_s`` from now."""
    start = now()
    while node.state != state:
        if now() - start > limit_s + STEP:
            raise AssertionError(f"{node.node_id} not in state {state} within {limit_s}s")
        await asyncio.sleep(STEP)
    return [t for t, node_id, s in transitions if node_id == node.node_id and s == state][-1]


async def test_a_serving_node_becomes_healthy_at_once(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor
) -> None:
    fake = TimedNode("n1")
    fleet.add(fake)
    latencies: list[float] = []
    monitor.observe_probe = latencies.append
    start = now()
    node, _ = registry.join(join_request("n1"))
    assert node.state == JOINING
    await settle()
    assert node.state == HEALTHY
    assert registry.dispatchable() == (node,)
    assert registry.capacity == 4
    # The first Check runs at once, with the load report.
    assert fake.check_times == [start]
    assert node.load is not None
    assert (node.load.node_id, node.load.capacity, node.load.draining) == ("n1", 4, False)
    assert node.load.engine_healthy
    assert node.last_health_check_at > 0
    assert node.health_check_latency_ms == 0.0
    assert latencies == [0.0]


async def test_a_healthy_node_is_checked_every_interval(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    start = now()
    node, fake = await join(registry, fleet)
    await clock.advance(INTERVAL - STEP)
    assert len(fake.check_times) == 1
    await clock.advance(4 * INTERVAL)
    assert fake.check_times == pytest.approx([start + i * INTERVAL for i in range(5)])
    # Each probe is a Check plus a load report.
    assert fake.checks == 10
    assert node.state == HEALTHY


async def test_not_serving_is_seen_through_the_watch_at_once(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    node, fake = await join(registry, fleet)
    await clock.advance(2.0)
    changed_at = now()
    fake.set_status("NOT_SERVING")
    await settle()  # no virtual time passes
    assert node.state == UNHEALTHY
    assert node.state_reason == "health watch: NOT_SERVING"
    assert registry.dispatchable() == ()
    assert registry.capacity == 0
    # The watch also asked for a probe at once (instead of at the next interval).
    assert fake.check_times[-1] == changed_at
    assert len(fake.check_times) == 2


async def test_a_killed_node_is_seen_through_the_broken_watch_at_once(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    node, fake = await join(registry, fleet)
    lost: list[str] = []
    node.lost_hooks.add(lost.append)
    await clock.advance(2.0)
    fake.kill()
    await settle()
    assert node.state == UNHEALTHY
    assert node.state_reason == "health watch stream broke: UNAVAILABLE"
    assert lost == ["health watch stream broke: UNAVAILABLE"]
    assert registry.dispatchable() == ()
    # It stays out while dead: the checks fail too (and report it lost again).
    await clock.advance(30.0)
    assert node.state == UNHEALTHY
    assert "health check failed: UNAVAILABLE connection refused" in lost
    assert node.good_probes == 0


async def test_a_killed_node_that_comes_back_is_readmitted(
    registry: Registry,
    fleet: FakeFleet,
    monitor: HealthMonitor,
    clock: VirtualClock,
    transitions: Transitions,
) -> None:
    node, fake = await join(registry, fleet)
    fake.kill()
    await clock.advance(30.0)
    assert node.state == UNHEALTHY
    fake.revive()
    revived_at = now()
    await settle()
    assert node.state == UNHEALTHY  # not on the spot: it must pass probes first
    # The watch reconnects within its backoff (<= interval) and asks for a probe, or the
    # backoff-paced checks (<= interval apart) find it: two passing probes within 2 intervals.
    readmitted_at = await reach(transitions, node, HEALTHY, 2 * INTERVAL)
    assert revived_at < readmitted_at <= revived_at + 2 * INTERVAL
    checks_since = [t for t in fake.check_times if t >= revived_at]
    assert len(checks_since) == registry.readmit_after
    assert checks_since[-1] == readmitted_at
    assert node.state_reason == "2 consecutive passing health checks"
    assert registry.dispatchable() == (node,)


async def test_a_frozen_node_is_ejected_by_the_next_checks_deadline(
    registry: Registry,
    fleet: FakeFleet,
    monitor: HealthMonitor,
    clock: VirtualClock,
    transitions: Transitions,
) -> None:
    joined_at = now()
    node, fake = await join(registry, fleet)
    lost: list[str] = []
    node.lost_hooks.add(lost.append)
    await clock.advance(2.0)
    frozen_at = now()
    fake.freeze()
    # The watch stays open and silent: only the next Check (at joined_at + interval) can tell,
    # when its deadline passes (timeout later).
    detected_at = await reach(transitions, node, UNHEALTHY, INTERVAL + DEADLINE)
    assert detected_at == pytest.approx(joined_at + INTERVAL + DEADLINE)
    assert detected_at - frozen_at <= INTERVAL + DEADLINE
    assert fake.check_times == pytest.approx([joined_at, joined_at + INTERVAL])
    assert node.state_reason == "health check failed: DEADLINE_EXCEEDED deadline exceeded"
    assert lost == ["health check failed: DEADLINE_EXCEEDED deadline exceeded"]
    assert registry.dispatchable() == ()


async def test_frozen_node_detection_worst_case(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, transitions: Transitions
) -> None:
    """Frozen just after a check: a whole interval plus the deadline, and not a moment more."""
    node, fake = await join(registry, fleet)
    frozen_at = now()
    fake.freeze()
    detected_at = await reach(transitions, node, UNHEALTHY, INTERVAL + DEADLINE)
    assert detected_at - frozen_at == pytest.approx(INTERVAL + DEADLINE)
    assert transitions[-1] == (detected_at, "n1", UNHEALTHY)


def failing_schedule(joined_at: float, until: float) -> list[float]:
    """When the checks of a node frozen right after it joined start (up to ``until``): one
    passing check at once, the next at the interval; each failing one takes the deadline and
    is followed by a wait growing from the probe backoff base to the interval."""
    times = [joined_at, joined_at + INTERVAL]
    delay = config.PROBE_BACKOFF_BASE_S
    while times[-1] + DEADLINE + min(INTERVAL, delay) <= until:
        times.append(times[-1] + DEADLINE + min(INTERVAL, delay))
        delay *= 2
    return times


async def test_unhealthy_nodes_are_reprobed_with_backoff_then_readmitted(
    registry: Registry,
    fleet: FakeFleet,
    monitor: HealthMonitor,
    clock: VirtualClock,
    transitions: Transitions,
) -> None:
    joined_at = now()
    node, fake = await join(registry, fleet)
    fake.freeze()
    await clock.advance(40.0)
    assert node.state == UNHEALTHY
    expected = failing_schedule(joined_at, now())
    assert fake.check_times == pytest.approx(expected)
    # Quick re-probes first, then one per interval + deadline.
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(expected[1:])]
    assert gaps[:3] == QUICK_GAPS
    assert gaps == sorted(gaps)
    assert gaps[-1] == INTERVAL + DEADLINE
    assert len(gaps) >= 8
    fake.revive()
    revived_at = now()
    schedule = failing_schedule(joined_at, revived_at + INTERVAL + DEADLINE)
    last_failed = max(t for t in schedule if t < revived_at)
    first_good = min(t for t in schedule if t >= revived_at)
    # No check is in flight at revived_at, so the next scheduled check passes, and the one
    # after it (the wait is the whole interval by now) re-admits.
    assert last_failed + DEADLINE <= revived_at
    readmitted_at = await reach(transitions, node, HEALTHY, DEADLINE + 2 * INTERVAL)
    assert readmitted_at == pytest.approx(first_good + INTERVAL)
    assert readmitted_at - revived_at <= DEADLINE + 2 * INTERVAL
    assert fake.check_times[-2:] == pytest.approx([first_good, first_good + INTERVAL])
    assert registry.dispatchable() == (node,)
    # Healthy again: back to one check per interval.
    await clock.advance(2 * INTERVAL + STEP)
    assert fake.check_times[-2:] == pytest.approx(
        [readmitted_at + INTERVAL, readmitted_at + 2 * INTERVAL]
    )
    # The backoff started over: a second incident is re-probed quickly again.
    fake.freeze()
    frozen_at = now()
    await clock.advance(3 * INTERVAL)
    again = [t for t in fake.check_times if t >= frozen_at]
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(again)]
    assert gaps[:3] == QUICK_GAPS


async def test_the_first_passing_probe_does_not_readmit(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    node, fake = await join(registry, fleet)
    fake.set_status("NOT_SERVING")
    await clock.advance(20.0)
    assert node.state == UNHEALTHY
    fake.set_status("SERVING")
    recovered_at = now()
    await settle()
    # The watch's SERVING does not re-admit, but it triggers a probe at once: the first pass.
    assert fake.check_times[-1] == recovered_at
    assert node.good_probes == 1
    assert node.state == UNHEALTHY
    assert registry.dispatchable() == ()


async def test_a_not_serving_node_recovers_within_an_interval_of_serving_again(
    registry: Registry,
    fleet: FakeFleet,
    monitor: HealthMonitor,
    clock: VirtualClock,
    transitions: Transitions,
) -> None:
    node, fake = await join(registry, fleet)
    fake.set_status("NOT_SERVING")
    await clock.advance(20.0)
    fake.set_status("SERVING")
    recovered_at = now()
    readmitted_at = await reach(transitions, node, HEALTHY, INTERVAL)
    # The waits between re-probes have grown to the interval by now (20 s of failures).
    assert readmitted_at - recovered_at == pytest.approx(INTERVAL)
    assert fake.check_times[-2:] == pytest.approx([recovered_at, readmitted_at])
    assert registry.dispatchable() == (node,)


async def test_load_is_stored_and_agent_draining_is_seen_at_the_next_probe(
    registry: Registry,
    fleet: FakeFleet,
    monitor: HealthMonitor,
    clock: VirtualClock,
    transitions: Transitions,
) -> None:
    joined_at = now()
    node, fake = await join(registry, fleet)
    first_load = node.load
    assert first_load is not None and not first_load.draining
    await clock.advance(1.0)
    fake.draining = True
    drained_at = await reach(transitions, node, DRAINING, INTERVAL)
    assert drained_at == pytest.approx(joined_at + INTERVAL)
    assert node.state_reason == "agent is draining"
    assert node.load is not None and node.load.draining
    assert node.load is not first_load
    assert node.verdict == HEALTHY
    assert registry.dispatchable() == ()
    assert registry.capacity == 0
    fake.draining = False
    undrained_at = await reach(transitions, node, HEALTHY, INTERVAL)
    assert undrained_at == pytest.approx(joined_at + 2 * INTERVAL)
    assert node.state_reason == "agent stopped draining"
    assert registry.dispatchable() == (node,)
    assert registry.capacity == 4


async def test_a_request_failure_triggers_a_probe_at_once(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    node, fake = await join(registry, fleet)
    await clock.advance(2.0)
    failed_at = now()
    registry.record_failure(node, "stream reset", unreachable=False)
    await settle()
    assert fake.check_times[-1] == failed_at
    assert node.state == HEALTHY


class SlowCheckNode(TimedNode):
    async def check(self, timeout_s: float) -> str:
        status = await super().check(timeout_s)
        await asyncio.sleep(0.5)  # a healthy but slow answer
        return status


async def test_a_request_failure_during_a_check_gets_a_probe_right_after_it(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    fake = SlowCheckNode("n1")
    fleet.add(fake)
    node, _ = registry.join(join_request("n1"))
    assert node.client is fake
    joined = now()
    # Checks take 0.5 s, then the next comes an interval later: the second runs 5.5-6.0.
    await clock.advance(0.5 + INTERVAL + 0.2)
    registry.record_failure(node, "stream reset", unreachable=False)
    await clock.advance(1.0)
    # Not an interval later: right when the check in flight ends.
    second = joined + 0.5 + INTERVAL
    assert fake.check_times == pytest.approx([joined, second, second + 0.5])


async def test_remove_stops_the_nodes_tasks(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    node, fake = await join(registry, fleet)
    other, other_fake = await join(registry, fleet, "n2")
    await clock.advance(1.0)
    checks = fake.checks
    registry.remove(node, "operator")
    await settle()
    assert id(node) not in monitor._tasks
    assert id(other) in monitor._tasks
    assert fake._watchers == set()  # the watch stream was closed
    assert fake.closed
    await clock.advance(60.0)
    assert fake.checks == checks
    assert node.state_reason == "operator"
    # The other node is still watched and checked.
    assert len(other_fake.check_times) == 1 + int(61.0 // INTERVAL)


async def test_remove_while_a_check_hangs(
    registry: Registry, fleet: FakeFleet, monitor: HealthMonitor, clock: VirtualClock
) -> None:
    node, fake = await join(registry, fleet)
    fake.freeze()
    await clock.advance(INTERVAL + DEADLINE / 2)  # the second check is hanging now
    assert len(fake.check_times) == 2
    lost: list[str] = []
    node.lost_hooks.add(lost.append)
    registry.remove(node, "operator")
    await clock.advance(60.0)
    assert len(fake.check_times) == 2
    # The hanging check was cancelled: it reported nothing after the removal.
    assert lost == ["node removed: operator"]
    assert node.verdict == HEALTHY
