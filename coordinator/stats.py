"""Cluster statistics: the keys the SDK's ``get_stats()`` documents (num_nodes, healthy_nodes,
unhealthy_nodes, load_distribution, health_stats) plus totals.

With ``--workers N`` the request counters live in the worker processes: the control process
sums what each worker reports (``sum_counters``, ``sum_node_counters``) and passes the sums in.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from coordinator.dispatch import DispatchCounters
from coordinator.registry import HEALTHY, Node, Registry
from omni_rpc.v1 import coordinator_pb2


@dataclass
class NodeCounters:
    """What the processes that dispatch count of one node (summed over workers)."""

    in_flight: int = 0
    dispatched: int = 0
    served: int = 0


def sum_counters(parts: Iterable[DispatchCounters]) -> DispatchCounters:
    total = DispatchCounters()
    for part in parts:
        for counter in fields(DispatchCounters):
            name = counter.name
            setattr(total, name, getattr(total, name) + getattr(part, name))
    return total


def sum_node_counters(
    parts: Iterable[Mapping[tuple[str, str], NodeCounters]],
) -> dict[tuple[str, str], NodeCounters]:
    """Per (node_id, address): the sum over ``parts`` (a node that came back from a new address
    is another node, with counters of its own)."""
    total: dict[tuple[str, str], NodeCounters] = {}
    for part in parts:
        for key, counters in part.items():
            into = total.setdefault(key, NodeCounters())
            into.in_flight += counters.in_flight
            into.dispatched += counters.dispatched
            into.served += counters.served
    return total


def node_info(
    node: Node, counters: Mapping[tuple[str, str], NodeCounters] | None = None
) -> coordinator_pb2.NodeInfo:
    """``node.to_proto()``, with the dispatch counters from ``counters`` when given."""
    info = node.to_proto()
    if counters is not None:
        mine = counters.get((node.node_id, node.address), NodeCounters())
        info.in_flight = mine.in_flight
        info.dispatched = mine.dispatched
        info.served = mine.served
    return info


def cluster_stats(
    registry: Registry,
    counters: DispatchCounters,
    *,
    strategy: str,
    health_check_interval_s: float,
    max_retries: int,
    coordinator_id: str,
    started_at: float,
    node_counters: Mapping[tuple[str, str], NodeCounters] | None = None,
) -> coordinator_pb2.ClusterStats:
    nodes = sorted(registry.nodes.values(), key=lambda n: n.node_id)
    stats = coordinator_pb2.ClusterStats(
        num_nodes=len(nodes),
        # Draining nodes are healthy, just not taking new work; they count as healthy.
        healthy_nodes=[n.node_id for n in nodes if n.verdict == HEALTHY],
        unhealthy_nodes=[n.node_id for n in nodes if n.verdict != HEALTHY],
        strategy=strategy,
        health_check_interval_s=health_check_interval_s,
        max_retries=max_retries,
        requests_total=counters.requests_total,
        requests_succeeded=counters.requests_succeeded,
        requests_failed=counters.requests_failed,
        requests_cancelled=counters.requests_cancelled,
        retries_total=counters.retries_total,
        resumes_total=counters.resumes_total,
        in_flight=counters.in_flight,
        coordinator_id=coordinator_id,
        uptime_s=time.time() - started_at,
    )
    for node in nodes:
        info = node_info(node, node_counters)
        stats.load_distribution[node.node_id] = info.dispatched
        stats.health_stats[node.node_id].CopyFrom(info)
    return stats
