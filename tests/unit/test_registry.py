"""The registry's state machine (coordinator/registry.py) on fake nodes and virtual time.

Fixture registry: BreakerPolicy(threshold=3, base_s=30, max_s=300), readmit_after=2. After
every kind of transition the derived view the hot path reads (``dispatchable()`` and
``capacity``) is checked against the nodes' states.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.registry import (
    DRAINING,
    HEALTHY,
    JOINING,
    LEFT,
    UNHEALTHY,
    Node,
    Registry,
    state_name,
)
from omni_rpc.v1 import coordinator_pb2
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeFleet, FakeNode, join_request


def ids(registry: Registry) -> list[str]:
    return [n.node_id for n in registry.dispatchable()]


def assert_view(registry: Registry, expected: dict[str, int]) -> None:
    """``expected``: node id -> capacity of the nodes that must be dispatchable, exactly."""
    view = registry.dispatchable()
    assert isinstance(view, tuple)
    assert [n.node_id for n in view] == sorted(expected)
    assert registry.capacity == sum(max(1, c) for c in expected.values())
    # The cached view agrees with the nodes' own states.
    assert [n.node_id for n in view] == sorted(
        n.node_id for n in registry.nodes.values() if n.state == HEALTHY
    )


def healthy(registry: Registry, node_id: str, capacity: int = 4) -> Node:
    node, new = registry.join(join_request(node_id, capacity))
    assert new
    registry.report_watch(node, True, "health watch: SERVING")
    assert node.state == HEALTHY
    return node


def eject(registry: Registry, node: Node, error: str = "boom") -> None:
    for _ in range(registry.breaker_policy.threshold):
        registry.record_failure(node, error, unreachable=False)


# -- join ---------------------------------------------------------------------------------------


async def test_join_registers_a_joining_node(registry: Registry, fleet: FakeFleet) -> None:
    added: list[Node] = []
    registry.on_added.append(added.append)
    node, new = registry.join(join_request("n1", capacity=4))
    assert new
    assert added == [node]
    assert registry.nodes == {"n1": node}
    assert node.state == JOINING
    assert node.state_reason == "joined"
    assert node.client is fleet.nodes["n1"]
    assert node.breaker.policy == registry.breaker_policy
    assert not node.dispatchable
    assert_view(registry, {})


async def test_refresh_keeps_the_node_and_updates_capacity(registry: Registry) -> None:
    added: list[Node] = []
    registry.on_added.append(added.append)
    node = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=2)
    assert_view(registry, {"n1": 4, "n2": 2})
    again, new = registry.join(join_request("n1", capacity=8))
    assert not new
    assert again is node
    assert node.capacity == 8
    assert node.state == HEALTHY
    assert len(added) == 2  # no listener call for a refresh
    assert_view(registry, {"n1": 8, "n2": 2})
    # A node reporting no capacity still counts as one.
    registry.join(join_request("n1", capacity=0))
    assert_view(registry, {"n1": 0, "n2": 2})
    assert registry.capacity == 3


async def test_rejoin_from_a_new_address_replaces_the_node(
    registry: Registry, fleet: FakeFleet
) -> None:
    added: list[Node] = []
    removed: list[Node] = []
    registry.on_added.append(added.append)
    registry.on_removed.append(removed.append)
    old = healthy(registry, "n1")
    old_client = fleet.nodes.pop("n1")  # the connector makes a new client for the new address
    lost: list[str] = []
    old.lost_hooks.add(lost.append)
    new_request = join_request("n1")
    new_request.address = "n1.elsewhere:2"
    node, new = registry.join(new_request)
    assert new
    assert node is not old
    assert registry.nodes == {"n1": node}
    assert old.state == LEFT
    assert old.state_reason == "replaced by a re-join from a new address"
    assert removed == [old]
    assert added == [old, node]
    assert lost == ["node removed: replaced by a re-join from a new address"]
    assert node.state == JOINING
    assert node.address == "n1.elsewhere:2"
    assert_view(registry, {})
    await asyncio.sleep(0)  # the old client is closed in a task
    assert isinstance(old_client, FakeNode)
    assert old_client.closed
    assert node.client is fleet.nodes["n1"]
    assert node.client is not old_client
    assert not fleet.nodes["n1"].closed


async def test_takeover_problem(registry: Registry) -> None:
    other = join_request("n1")
    other.address = "impostor.test:9"
    assert registry.takeover_problem(other) == ""  # unknown id
    node, _ = registry.join(join_request("n1"))
    assert registry.takeover_problem(other) == ""  # still joining: may move
    registry.report_watch(node, True, "serving")
    problem = registry.takeover_problem(other)
    assert "'n1'" in problem
    assert "n1.test:1" in problem
    assert registry.takeover_problem(join_request("n1")) == ""  # same address: a refresh
    # A drained node is still healthy: it keeps its id.
    registry.set_drained(node, True)
    assert registry.takeover_problem(other) != ""
    registry.set_drained(node, False)
    registry.report_unreachable(node, "gone")
    assert registry.takeover_problem(other) == ""


async def test_dispatchable_is_in_node_id_order(registry: Registry) -> None:
    for node_id, capacity in [("n3", 1), ("n1", 2), ("n2", 3), ("n0", 4)]:
        healthy(registry, node_id, capacity)
    assert ids(registry) == ["n0", "n1", "n2", "n3"]
    assert registry.capacity == 10
    registry.report_unreachable(registry.nodes["n1"], "gone")
    assert ids(registry) == ["n0", "n2", "n3"]
    registry.report_probe(registry.nodes["n1"], True, False, "ok")
    registry.report_probe(registry.nodes["n1"], True, False, "ok")
    assert ids(registry) == ["n0", "n1", "n2", "n3"]
    assert_view(registry, {"n0": 4, "n1": 2, "n2": 3, "n3": 1})


# -- leave / remove -----------------------------------------------------------------------------


async def test_leave(registry: Registry, fleet: FakeFleet) -> None:
    removed: list[Node] = []
    registry.on_removed.append(removed.append)
    n1 = healthy(registry, "n1", capacity=4)
    n2 = healthy(registry, "n2", capacity=3)
    assert not registry.leave("nobody", "bye")
    assert not registry.leave("n1", "bye", address="elsewhere:1")
    assert registry.nodes.keys() == {"n1", "n2"}
    assert_view(registry, {"n1": 4, "n2": 3})
    assert registry.leave("n1", "bye", address="n1.test:1")
    assert n1.state == LEFT
    assert n1.state_reason == "left: bye"
    assert_view(registry, {"n2": 3})
    assert registry.leave("n2", "")
    assert n2.state_reason == "left"
    assert registry.nodes == {}
    assert removed == [n1, n2]
    assert_view(registry, {})
    await asyncio.sleep(0)
    assert fleet.nodes["n1"].closed and fleet.nodes["n2"].closed


async def test_remove_calls_lost_hooks_and_updates_the_view(registry: Registry) -> None:
    n1 = healthy(registry, "n1", capacity=2)
    healthy(registry, "n2", capacity=5)
    reasons: list[str] = []
    n1.lost_hooks.add(reasons.append)
    registry.remove(n1, "operator")
    assert reasons == ["node removed: operator"]
    assert n1.state == LEFT
    assert "n1" not in registry.nodes
    assert_view(registry, {"n2": 5})


# -- health verdicts ----------------------------------------------------------------------------


async def test_first_serving_watch_makes_a_joining_node_healthy(registry: Registry) -> None:
    node, _ = registry.join(join_request("n1", capacity=6))
    registry.report_watch(node, True, "health watch: SERVING")
    assert node.state == HEALTHY
    assert node.state_reason == "health watch: SERVING"
    assert node.probe_now.is_set()
    assert_view(registry, {"n1": 6})


async def test_first_serving_probe_makes_a_joining_node_healthy(registry: Registry) -> None:
    node, _ = registry.join(join_request("n1", capacity=6))
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == HEALTHY
    assert node.state_reason == "health check: SERVING"
    assert_view(registry, {"n1": 6})


async def test_joining_node_not_serving_becomes_unhealthy(registry: Registry) -> None:
    node, _ = registry.join(join_request("n1"))
    registry.report_probe(node, False, False, "health check: NOT_SERVING")
    assert node.state == UNHEALTHY
    assert node.state_reason == "health check: NOT_SERVING"
    assert_view(registry, {})


async def test_watch_not_serving_makes_a_node_unhealthy(registry: Registry) -> None:
    n1 = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=2)
    n1.probe_now.clear()
    registry.report_watch(n1, False, "health watch: NOT_SERVING")
    assert n1.state == UNHEALTHY
    assert n1.state_reason == "health watch: NOT_SERVING"
    assert n1.probe_now.is_set()  # a probe tells why
    assert_view(registry, {"n2": 2})
    # A serving watch does not re-admit an unhealthy node: only probes do.
    registry.report_watch(n1, True, "health watch: SERVING")
    assert n1.state == UNHEALTHY
    assert_view(registry, {"n2": 2})


async def test_probe_not_serving_makes_a_node_unhealthy(registry: Registry) -> None:
    node = healthy(registry, "n1")
    registry.report_probe(node, False, False, "health check: NOT_SERVING")
    assert node.state == UNHEALTHY
    assert node.state_reason == "health check: NOT_SERVING"
    assert_view(registry, {})


async def test_readmission_needs_consecutive_good_probes(registry: Registry) -> None:
    node = healthy(registry, "n1", capacity=3)
    registry.report_probe(node, False, False, "health check: NOT_SERVING")
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.good_probes == 1
    assert node.state == UNHEALTHY
    assert_view(registry, {})
    # A failing probe in between starts the count over.
    registry.report_probe(node, False, False, "health check: NOT_SERVING")
    assert node.good_probes == 0
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == UNHEALTHY
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(registry.wait_available(100.0))
    await asyncio.sleep(1.0)
    assert not waiter.done()
    start = loop.time()
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == HEALTHY
    assert node.state_reason == "2 consecutive passing health checks"
    assert_view(registry, {"n1": 3})
    await waiter
    assert loop.time() == start  # woken by the re-admission, not by its timeout


async def test_report_unreachable(registry: Registry) -> None:
    n1 = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=1)
    reasons: list[str] = []
    n1.lost_hooks.add(reasons.append)
    n1.good_probes = 1
    registry.report_unreachable(n1, "health watch stream broke: UNAVAILABLE")
    assert n1.state == UNHEALTHY
    assert n1.state_reason == "health watch stream broke: UNAVAILABLE"
    assert n1.good_probes == 0
    assert reasons == ["health watch stream broke: UNAVAILABLE"]
    assert_view(registry, {"n2": 1})
    # Every report calls the hooks (streams opened meanwhile are lost too); the reason of the
    # state stays the first one.
    registry.report_unreachable(n1, "health check failed: DEADLINE_EXCEEDED")
    assert reasons[-1] == "health check failed: DEADLINE_EXCEEDED"
    assert n1.state_reason == "health watch stream broke: UNAVAILABLE"


# -- draining -----------------------------------------------------------------------------------


async def test_agent_reported_draining(registry: Registry) -> None:
    n1 = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=2)
    registry.report_probe(n1, True, True, "health check: SERVING")
    assert n1.state == DRAINING
    assert n1.state_reason == "agent is draining"
    assert not n1.dispatchable
    assert_view(registry, {"n2": 2})
    # A draining agent that says NOT_SERVING keeps its verdict: it is draining, not broken.
    registry.report_probe(n1, False, True, "health check: NOT_SERVING")
    assert n1.verdict == HEALTHY
    assert n1.state == DRAINING
    registry.report_probe(n1, True, False, "health check: SERVING")
    assert n1.state == HEALTHY
    assert n1.state_reason == "agent stopped draining"
    assert_view(registry, {"n1": 4, "n2": 2})


async def test_operator_drain_and_undrain(registry: Registry) -> None:
    n1 = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=2)
    registry.set_drained(n1, True)
    assert n1.state == DRAINING
    assert n1.state_reason == "drained by operator"
    assert_view(registry, {"n2": 2})
    registry.set_drained(n1, True)  # no-op
    assert n1.state_reason == "drained by operator"
    loop = asyncio.get_running_loop()
    waiter = asyncio.create_task(registry.wait_available(100.0))
    await asyncio.sleep(1.0)
    assert not waiter.done()
    start = loop.time()
    registry.set_drained(n1, False)
    assert n1.state == HEALTHY
    assert n1.state_reason == "undrained by operator"
    assert_view(registry, {"n1": 4, "n2": 2})
    await waiter
    assert loop.time() == start  # woken by the undrain, not by its timeout


async def test_drain_facts_are_independent(registry: Registry) -> None:
    node = healthy(registry, "n1")
    registry.set_drained(node, True)
    registry.report_probe(node, True, True, "health check: SERVING")
    registry.set_drained(node, False)
    assert node.state == DRAINING  # the agent itself is still draining
    assert_view(registry, {})
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == HEALTHY
    # Drained while unhealthy: shows as draining, and undraining shows the verdict again.
    registry.report_unreachable(node, "gone")
    registry.set_drained(node, True)
    assert node.state == DRAINING
    registry.set_drained(node, False)
    assert node.state == UNHEALTHY
    assert_view(registry, {})


# -- passive failures and the breaker -----------------------------------------------------------


async def test_breaker_ejects_after_threshold_failures(registry: Registry) -> None:
    ejected: list[Node] = []
    registry.on_ejected.append(ejected.append)
    n1 = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=2)
    registry.record_failure(n1, "e1", unreachable=False)
    registry.record_failure(n1, "e2", unreachable=False)
    assert n1.state == HEALTHY
    assert n1.consecutive_failures == 2
    assert_view(registry, {"n1": 4, "n2": 2})
    registry.record_failure(n1, "e3", unreachable=False)
    assert ejected == [n1]
    assert n1.state == UNHEALTHY
    assert n1.state_reason == (
        "circuit breaker open after 3 consecutive failures (ejection #1, 30s): e3"
    )
    assert n1.failures == 3
    assert n1.last_error == "e3"
    assert n1.probe_now.is_set()
    assert_view(registry, {"n2": 2})
    # Failures while out of rotation are one incident: not counted by the breaker.
    for i in range(10):
        registry.record_failure(n1, f"late {i}", unreachable=i % 2 == 0)
    assert ejected == [n1]
    assert n1.breaker.ejections == 1
    assert n1.consecutive_failures == 0
    assert n1.failures == 13
    assert n1.last_error == "late 9"
    assert n1.state_reason.startswith("circuit breaker open")


async def test_success_resets_the_failure_count(registry: Registry) -> None:
    node = healthy(registry, "n1")
    registry.record_failure(node, "e", unreachable=False)
    registry.record_failure(node, "e", unreachable=False)
    registry.record_success(node)
    assert node.served == 1
    assert node.consecutive_failures == 0
    registry.record_failure(node, "e", unreachable=False)
    registry.record_failure(node, "e", unreachable=False)
    assert node.state == HEALTHY
    assert node.breaker.ejections == 0


async def test_unreachable_failure_ejects_at_once(registry: Registry) -> None:
    ejected: list[Node] = []
    registry.on_ejected.append(ejected.append)
    n1 = healthy(registry, "n1", capacity=4)
    healthy(registry, "n2", capacity=2)
    registry.record_failure(n1, "connection refused", unreachable=True)
    assert n1.state == UNHEALTHY
    assert n1.state_reason == "request failed: connection refused"
    assert ejected == []  # not the breaker: a probe re-admits it
    assert not n1.breaker.is_open(asyncio.get_running_loop().time())
    assert_view(registry, {"n2": 2})
    registry.report_probe(n1, True, False, "ok")
    registry.report_probe(n1, True, False, "ok")
    assert n1.state == HEALTHY
    assert_view(registry, {"n1": 4, "n2": 2})


async def test_failures_of_a_joining_node_do_not_count(registry: Registry) -> None:
    node, _ = registry.join(join_request("n1"))
    for _ in range(5):
        registry.record_failure(node, "e", unreachable=True)
    assert node.state == JOINING
    assert node.breaker.consecutive_failures == 0
    assert node.failures == 5


async def test_no_readmission_while_the_breaker_is_open(
    registry: Registry, clock: VirtualClock
) -> None:
    node = healthy(registry, "n1", capacity=4)
    loop = asyncio.get_running_loop()
    start = loop.time()
    eject(registry, node)
    assert node.breaker.ejected_until == pytest.approx(start + 30.0)
    for _ in range(5):
        registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == UNHEALTHY
    assert node.good_probes == 0
    await clock.advance(29.0)
    registry.report_probe(node, True, False, "health check: SERVING")
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == UNHEALTHY
    assert node.good_probes == 0
    assert_view(registry, {})
    await clock.advance(1.5)  # past the 30 s ejection: half-open
    assert loop.time() - start == pytest.approx(30.5)
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == UNHEALTHY
    assert node.good_probes == 1
    registry.report_probe(node, True, False, "health check: SERVING")
    assert node.state == HEALTHY
    assert_view(registry, {"n1": 4})
    # The second ejection lasts twice as long.
    eject(registry, node)
    assert node.breaker.ejections == 2
    assert "(ejection #2, 60s)" in node.state_reason
    await clock.advance(59.0)
    registry.report_probe(node, True, False, "ok")
    assert node.good_probes == 0
    await clock.advance(1.5)
    registry.report_probe(node, True, False, "ok")
    registry.report_probe(node, True, False, "ok")
    assert node.state == HEALTHY


# -- wait_available -----------------------------------------------------------------------------


async def test_wait_available_times_out_on_virtual_time(registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    registry.join(join_request("n1"))
    start = loop.time()
    await registry.wait_available(5.0)
    assert loop.time() - start == pytest.approx(5.0)
    start = loop.time()
    await registry.wait_available(-1.0)  # a deadline already passed: at once
    assert loop.time() == start


async def test_wait_available_wakes_when_a_node_becomes_dispatchable(registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    node, _ = registry.join(join_request("n1"))
    start = loop.time()
    waiter = asyncio.create_task(registry.wait_available(10.0))
    await asyncio.sleep(2.0)
    assert not waiter.done()
    # Transitions that make nothing dispatchable do not wake it.
    registry.report_probe(node, False, False, "not serving")
    registry.join(join_request("n2"))
    await asyncio.sleep(0)
    assert not waiter.done()
    registry.report_probe(node, True, False, "ok")
    registry.report_probe(node, True, False, "ok")
    assert node.state == HEALTHY
    await waiter
    assert loop.time() - start == pytest.approx(2.0)


async def test_wait_available_wakes_on_join_then_healthy(registry: Registry) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    waiter = asyncio.create_task(registry.wait_available(10.0))
    await asyncio.sleep(1.0)
    node, _ = registry.join(join_request("n1"))
    await asyncio.sleep(1.0)
    assert not waiter.done()  # joining is not dispatchable
    registry.report_watch(node, True, "serving")
    await waiter
    assert loop.time() - start == pytest.approx(2.0)


# -- names and NodeInfo -------------------------------------------------------------------------


def test_state_names() -> None:
    assert [state_name(s) for s in (JOINING, HEALTHY, UNHEALTHY, DRAINING, LEFT)] == [
        "joining",
        "healthy",
        "unhealthy",
        "draining",
        "left",
    ]


async def test_node_info(registry: Registry) -> None:
    request = join_request("n1", capacity=7)
    request.model = "m"
    node, _ = registry.join(request)
    info = node.to_proto()
    assert isinstance(info, coordinator_pb2.NodeInfo)
    assert (info.node_id, info.address, info.model, info.engine, info.capacity) == (
        "n1",
        "n1.test:1",
        "m",
        "fake",
        7,
    )
    assert info.state == JOINING
    assert info.state_reason == "joined"
    assert info.ejected_until == 0.0
    assert info.ejections == 0
    assert not info.HasField("load")
    registry.report_watch(node, True, "serving")
    registry.record_failure(node, "e1", unreachable=False)
    info = node.to_proto()
    assert info.state == HEALTHY
    assert info.consecutive_failures == 1
    assert info.failures == 1
    assert info.last_error == "e1"


async def test_node_info_while_ejected(registry: Registry, clock: VirtualClock) -> None:
    node = healthy(registry, "n1")
    eject(registry, node, "wedged")
    before = time.time()
    info = node.to_proto()
    after = time.time()
    assert info.state == UNHEALTHY
    assert info.state_reason.endswith(": wedged")
    assert info.ejections == 1
    assert info.consecutive_failures == 0
    assert info.failures == 3
    # A wall-clock time, 30 s from now (virtual seconds are mapped onto the wall clock).
    assert before + 30.0 - 1e-3 <= info.ejected_until <= after + 30.0 + 1e-3
    await clock.advance(10.0)
    before = time.time()
    info = node.to_proto()
    after = time.time()
    assert before + 20.0 - 1e-3 <= info.ejected_until <= after + 20.0 + 1e-3
