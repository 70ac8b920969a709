"""The pure pieces of ``--workers N``: the control process's pushes (``ControlHub``), a worker's
replica applying them (``ReplicaRegistry``), node reports, and summing stats and metrics.

In process, on fake nodes and virtual time; tests/test_workers.py runs the real processes.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from coordinator.control import ControlHub, WorkerLink
from coordinator.dispatch import DispatchCounters
from coordinator.registry import DRAINING, HEALTHY, JOINING, UNHEALTHY, Registry
from coordinator.replica import ReplicaRegistry, node_counters
from coordinator.stats import NodeCounters, cluster_stats, sum_counters, sum_node_counters
from omni_rpc.metrics import merge_exposition
from omni_rpc.v1 import control_pb2, node_pb2
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeFleet, join_request


def attach(hub: ControlHub, index: int = 0) -> WorkerLink:
    link = WorkerLink(index, 100 + index)
    hub.links[index] = link
    hub.push_now([link])
    return link


def drain(link: WorkerLink) -> list[control_pb2.ControlMessage]:
    messages = []
    while not link.outbox.empty():
        message = link.outbox.get_nowait()
        assert message is not None
        messages.append(message)
    return messages


def snapshots(link: WorkerLink) -> list[control_pb2.ClusterSnapshot]:
    return [m.snapshot for m in drain(link) if m.WhichOneof("kind") == "snapshot"]


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# -- the control process pushes -------------------------------------------------------------------


async def test_every_change_is_pushed_once_per_loop_turn(
    registry: Registry, clock: VirtualClock
) -> None:
    hub = ControlHub(registry, load_interval_s=1.0)
    link = attach(hub)
    assert [len(s.nodes) for s in snapshots(link)] == [0]
    node, _ = registry.join(join_request("n1"))
    registry.report_watch(node, True, "health watch: SERVING")
    await settle()
    [pushed] = snapshots(link)  # joined and healthy in one turn: one push
    assert pushed.version == 2
    assert [(n.info.node_id, n.verdict) for n in pushed.nodes] == [("n1", HEALTHY)]
    registry.set_drained(node, True)
    await settle()
    [pushed] = snapshots(link)
    assert pushed.nodes[0].drained and pushed.version == 3
    registry.leave("n1", "bye")
    await settle()
    assert [len(s.nodes) for s in snapshots(link)] == [0]


async def test_loads_are_pushed_at_most_once_per_interval(
    registry: Registry, clock: VirtualClock
) -> None:
    hub = ControlHub(registry, load_interval_s=1.0)
    node, _ = registry.join(join_request("n1"))
    link = attach(hub)
    await settle()
    drain(link)
    pusher = asyncio.create_task(hub.push_loads())
    try:
        await clock.advance(1.5)
        assert snapshots(link) == []  # nothing changed
        for running in range(5):
            node.load = node_pb2.NodeLoad(running=running)
            await clock.advance(0.1)
        await clock.advance(1.0)
        [pushed] = snapshots(link)
        assert pushed.nodes[0].load.running == 4
    finally:
        pusher.cancel()


async def test_a_lost_node_is_an_event_for_every_worker(
    registry: Registry, clock: VirtualClock
) -> None:
    hub = ControlHub(registry, load_interval_s=1.0)
    links = [attach(hub, 0), attach(hub, 1)]
    node, _ = registry.join(join_request("n1"))
    registry.report_unreachable(node, "health check failed: DEADLINE_EXCEEDED")
    for link in links:
        kinds = [m.WhichOneof("kind") for m in drain(link)]
        assert "lost" in kinds


async def test_drain_waits_for_every_worker_to_acknowledge(
    registry: Registry, clock: VirtualClock
) -> None:
    hub = ControlHub(registry, load_interval_s=1.0)
    links = [attach(hub, 0), attach(hub, 1)]
    version = hub.push_now()
    waiting = asyncio.create_task(hub.wait_acked(version, 5.0))
    await settle()
    links[0].ack(version)
    await settle()
    assert not waiting.done()
    links[1].ack(version)
    assert await waiting == []
    # A worker that never answers is named after the timeout.
    version = hub.push_now()
    assert await hub.wait_acked(version, 5.0) == [0, 1]


async def test_failure_reports_feed_the_breaker_and_are_acknowledged(
    registry: Registry, clock: VirtualClock
) -> None:
    hub = ControlHub(registry, load_interval_s=1.0)
    link = attach(hub)
    node, _ = registry.join(join_request("n1"))
    registry.report_watch(node, True, "health watch: SERVING")
    await settle()
    drain(link)

    def report(report_id: int, success: bool = False) -> None:
        hub._report(
            link,
            control_pb2.NodeReport(
                report_id=report_id, node_id="n1", address=node.address, success=success
            ),
        )

    report(1)
    report(2)
    assert node.consecutive_failures == 2
    # Processed with nothing else to push: this worker is told its reports are in.
    assert snapshots(link)[-1].reports_seen == 2
    report(3, success=True)
    assert node.consecutive_failures == 0
    for report_id in (4, 5, 6):  # the fixture's breaker: 3 consecutive failures eject
        report(report_id)
    assert node.state == UNHEALTHY and node.breaker.ejections == 1
    await settle()
    assert snapshots(link)[-1].nodes[0].verdict == UNHEALTHY


# -- a worker's replica ---------------------------------------------------------------------------


def snapshot(
    version: int, *nodes: control_pb2.NodeSnapshot, seen: int = 0
) -> control_pb2.ClusterSnapshot:
    return control_pb2.ClusterSnapshot(version=version, nodes=nodes, reports_seen=seen)


def pushed(
    node_id: str, verdict: int = HEALTHY, drained: bool = False, address: str = ""
) -> control_pb2.NodeSnapshot:
    info = join_request(node_id)
    if address:
        info.address = address
    return control_pb2.NodeSnapshot(info=info, verdict=verdict, drained=drained)  # type: ignore[arg-type]


async def test_replica_follows_the_snapshots(clock: VirtualClock, fleet: FakeFleet) -> None:
    replica = ReplicaRegistry(fleet)
    replica.apply(snapshot(1, pushed("a", JOINING), pushed("b")))
    assert [n.node_id for n in replica.dispatchable()] == ["b"]
    assert replica.nodes["a"].client is fleet.nodes["a"]
    replica.apply(snapshot(2, pushed("a"), pushed("b", drained=True)))
    assert [n.node_id for n in replica.dispatchable()] == ["a"]
    assert replica.nodes["b"].state == DRAINING
    # An old version arriving late changes nothing.
    replica.apply(snapshot(1, pushed("a", JOINING), pushed("b")))
    assert [n.node_id for n in replica.dispatchable()] == ["a"]
    # Gone from the snapshot: removed, its streams lost, its connection closed.
    b = replica.nodes["b"]
    lost: list[str] = []
    b.lost_hooks.add(lost.append)
    replica.apply(snapshot(3, pushed("a")))
    await settle()
    assert "b" not in replica.nodes and lost and fleet.nodes["b"].closed
    # Back from a new address: a new node with a new connection.
    a = replica.nodes["a"]
    replica.apply(snapshot(4, pushed("a", address="elsewhere:2")))
    assert replica.nodes["a"] is not a and replica.nodes["a"].address == "elsewhere:2"
    await replica.close()


async def test_replica_reports_failures_and_the_first_success_only(
    clock: VirtualClock, fleet: FakeFleet
) -> None:
    reports: list[control_pb2.NodeReport] = []
    replica = ReplicaRegistry(fleet, reports.append)
    replica.apply(snapshot(1, pushed("a")))
    node = replica.nodes["a"]
    replica.record_success(node)
    assert reports == []
    replica.record_failure(node, "a: INTERNAL boom", unreachable=False)
    replica.record_success(node)
    replica.record_success(node)
    assert [(r.report_id, r.success) for r in reports] == [(1, False), (2, True)]
    assert node.served == 3 and node.failures == 1
    await replica.close()


async def test_unreachable_holds_the_node_until_control_has_the_report(
    clock: VirtualClock, fleet: FakeFleet
) -> None:
    reports: list[control_pb2.NodeReport] = []
    replica = ReplicaRegistry(fleet, reports.append)
    replica.apply(snapshot(1, pushed("a"), pushed("b")))
    node = replica.nodes["a"]
    replica.record_failure(node, "a: UNAVAILABLE reset", unreachable=True)
    assert reports[-1].unreachable and reports[-1].report_id == 1
    assert [n.node_id for n in replica.dispatchable()] == ["b"]
    # A snapshot sent before the control process processed the report does not undo it...
    replica.apply(snapshot(2, pushed("a"), pushed("b"), seen=0))
    assert [n.node_id for n in replica.dispatchable()] == ["b"]
    # ...one sent after it does, whatever it decided.
    replica.apply(snapshot(3, pushed("a"), pushed("b"), seen=1))
    assert [n.node_id for n in replica.dispatchable()] == ["a", "b"]
    await replica.close()


async def test_a_lost_event_cancels_the_streams_on_the_node(
    clock: VirtualClock, fleet: FakeFleet
) -> None:
    replica = ReplicaRegistry(fleet)
    replica.apply(snapshot(1, pushed("a")))
    lost: list[str] = []
    replica.nodes["a"].lost_hooks.add(lost.append)
    replica.lost(control_pb2.NodeLost(node_id="a", address="other:1", reason="x"))
    assert lost == []  # another incarnation of the node
    replica.lost(control_pb2.NodeLost(node_id="a", address="a.test:1", reason="frozen"))
    assert lost == ["frozen"] and replica.nodes["a"].state == UNHEALTHY
    assert replica.dispatchable() == ()
    await replica.close()


# -- sums -----------------------------------------------------------------------------------------


async def test_stats_are_sums_over_workers(registry: Registry) -> None:
    node, _ = registry.join(join_request("n1"))
    registry.report_watch(node, True, "health watch: SERVING")
    total = sum_counters(
        [
            DispatchCounters(10, 9, 1, 2, 1, 3),
            DispatchCounters(5, 5, 0, 0, 0, 1),
        ]
    )
    assert total == DispatchCounters(15, 14, 1, 2, 1, 4)
    per_node = sum_node_counters(
        [
            node_counters(
                [
                    control_pb2.NodeCounters(
                        node_id="n1", address="n1.test:1", in_flight=1, dispatched=7, served=6
                    )
                ]
            ),
            {("n1", "n1.test:1"): NodeCounters(2, 8, 6), ("n1", "old:1"): NodeCounters(0, 9, 9)},
        ]
    )
    stats = cluster_stats(
        registry,
        total,
        strategy="round_robin",
        health_check_interval_s=1.0,
        max_retries=2,
        coordinator_id="c",
        started_at=0.0,
        node_counters=per_node,
    )
    assert stats.requests_total == 15 and stats.in_flight == 4
    assert stats.load_distribution["n1"] == 15
    info = stats.health_stats["n1"]
    assert (info.in_flight, info.dispatched, info.served) == (3, 15, 12)


def _worker_text(ok: int, durations: list[float], in_flight: int) -> str:
    registry = CollectorRegistry()
    requests = Counter("omni_requests", "calls", ["status"], registry=registry)
    duration = Histogram("omni_request_duration_seconds", "d", buckets=(1, 2), registry=registry)
    gauge = Gauge("omni_streams", "open", registry=registry)
    requests.labels("OK").inc(ok)
    requests.labels("UNAVAILABLE").inc(1)
    for value in durations:
        duration.observe(value)
    gauge.set(in_flight)
    return generate_latest(registry).decode()


def test_metrics_merge_sums_by_name_and_labels() -> None:
    merged = CollectorRegistry()

    class Merged(Collector):
        def collect(self) -> list[Metric]:
            return merge_exposition(
                [_worker_text(3, [0.5, 1.5], 2), _worker_text(4, [0.5, 5.0], 1)]
            )

    merged.register(Merged())
    text = generate_latest(merged).decode()
    lines = set(text.splitlines())
    assert 'omni_requests_total{status="OK"} 7.0' in lines
    assert 'omni_requests_total{status="UNAVAILABLE"} 2.0' in lines
    assert 'omni_request_duration_seconds_bucket{le="1.0"} 2.0' in lines
    assert 'omni_request_duration_seconds_bucket{le="2.0"} 3.0' in lines
    assert 'omni_request_duration_seconds_bucket{le="+Inf"} 4.0' in lines
    assert "omni_request_duration_seconds_count 4.0" in lines
    assert "omni_request_duration_seconds_sum 7.5" in lines
    assert "omni_streams 3.0" in lines
    assert "# TYPE omni_requests_total counter" in lines
    assert "# TYPE omni_request_duration_seconds histogram" in lines
    assert "_created" not in text
