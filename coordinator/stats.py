"""Cluster statistics: the keys the SDK's ``get_stats()`` documents (num_nodes, healthy_nodes,
unhealthy_nodes, load_distribution, health_stats) plus totals."""

from __future__ import annotations

import time

from coordinator.dispatch import DispatchCounters
from coordinator.registry import HEALTHY, Registry
from omni_rpc.v1 import coordinator_pb2


def cluster_stats(
    registry: Registry,
    counters: DispatchCounters,
    *,
    strategy: str,
    health_check_interval_s: float,
    max_retries: int,
    coordinator_id: str,
    started_at: float,
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
        retries_total=counters.retries_total,
        resumes_total=counters.resumes_total,
        in_flight=counters.in_flight,
        coordinator_id=coordinator_id,
        uptime_s=time.time() - started_at,
    )
    for node in nodes:
        stats.load_distribution[node.node_id] = node.dispatched
        stats.health_stats[node.node_id].CopyFrom(node.to_proto())
    return stats
