"""A small synchronous client of the Coordinator service, and plain-dict views of its replies.

Shared by the SDK's synchronous calls (``get_stats()``, ``HealthMonitor``, ``LoadBalancer``)
and the ``omni`` CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from omni_rpc import targets
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2

DEFAULT_CALL_TIMEOUT_S = 10.0


class CoordinatorUnreachable(ConnectionError):
    def __init__(self, address: str, detail: str) -> None:
        super().__init__(f"coordinator at {address} is unreachable: {detail}")
        self.address = address


def state_name(state: int) -> str:
    return coordinator_pb2.NodeState.Name(state).removeprefix("NODE_STATE_").lower()  # type: ignore[arg-type]


def load_dict(load: node_pb2.NodeLoad) -> dict[str, Any]:
    return {
        "running": load.running,
        "waiting": load.waiting,
        "capacity": load.capacity,
        "kv_cache_usage": load.kv_cache_usage,
        "started": load.started,
        "finished": load.finished,
        "aborted": load.aborted,
        "failed": load.failed,
        "generated_tokens": load.generated_tokens,
        "engine_healthy": load.engine_healthy,
        "draining": load.draining,
        "requests": load.requests,
        "prompt_tokens": load.prompt_tokens,
        "cached_prompt_tokens": load.cached_prompt_tokens,
    }


def node_dict(node: coordinator_pb2.NodeInfo) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "address": node.address,
        "model": node.model,
        "model_aliases": list(node.model_aliases),
        "input_modalities": list(node.input_modalities),
        "output_modalities": list(node.output_modalities),
        "cache_block_tokens": node.cache_block_tokens,
        "cache_capacity_tokens": node.cache_capacity_tokens,
        "engine": node.engine,
        "state": state_name(node.state),
        "state_reason": node.state_reason,
        "capacity": node.capacity,
        "gpu": node.gpu.index,
        "gpu_name": node.gpu.name,
        "visible_devices": node.gpu.visible_devices,
        "launcher": node.placement.launcher,
        "host": node.placement.host,
        "placement_labels": dict(sorted(node.placement.labels.items())),
        "version": node.version,
        "in_flight": node.in_flight,
        "dispatched": node.dispatched,
        "served": node.served,
        "failures": node.failures,
        "consecutive_failures": node.consecutive_failures,
        "last_error": node.last_error,
        "load": load_dict(node.load),
        "joined_at": node.joined_at,
        "state_since": node.state_since,
        "last_health_check_at": node.last_health_check_at,
        "health_check_latency_ms": node.health_check_latency_ms,
        "ejections": node.ejections,
        "ejected_until": node.ejected_until,
    }


def stats_dict(stats: coordinator_pb2.ClusterStats) -> dict[str, Any]:
    """The documented keys of ``get_stats()`` first (num_nodes, healthy_nodes, unhealthy_nodes,
    load_distribution, health_stats), then the coordinator's totals."""
    return {
        "num_nodes": stats.num_nodes,
        "healthy_nodes": list(stats.healthy_nodes),
        "unhealthy_nodes": list(stats.unhealthy_nodes),
        "load_distribution": dict(sorted(stats.load_distribution.items())),
        "health_stats": {k: node_dict(v) for k, v in sorted(stats.health_stats.items())},
        "strategy": stats.strategy,
        "health_check_interval": stats.health_check_interval_s,
        "max_retries": stats.max_retries,
        "requests_total": stats.requests_total,
        "requests_succeeded": stats.requests_succeeded,
        "requests_failed": stats.requests_failed,
        "requests_cancelled": stats.requests_cancelled,
        "retries_total": stats.retries_total,
        "resumes_total": stats.resumes_total,
        "in_flight": stats.in_flight,
        "coordinator_id": stats.coordinator_id,
        "uptime_s": stats.uptime_s,
    }


class CoordinatorClient:
    """Blocking calls to the Coordinator service (for code outside an event loop)."""

    def __init__(
        self,
        address: str | Sequence[str],
        timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        security: ChannelSecurity | None = None,
    ) -> None:
        """``address``: one coordinator, several (a list or ``a:1,b:2``: each call goes to one
        of those that answer), or ``dns:///NAME:PORT`` (see ``omni_rpc.targets``)."""
        self.address = targets.describe(address)
        self.timeout_s = timeout_s
        target, options = targets.client_channel_target(address)
        self._channel = (security or ChannelSecurity()).sync_channel(target, options)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                detail = exc.details() or code.name
                raise CoordinatorUnreachable(self.address, detail) from None
            raise

    def stats(self) -> coordinator_pb2.ClusterStats:
        result: coordinator_pb2.ClusterStats = self._call(
            self._stub.GetStats, coordinator_pb2.GetStatsRequest()
        )
        return result

    def nodes(self) -> list[coordinator_pb2.NodeInfo]:
        response: coordinator_pb2.ListNodesResponse = self._call(
            self._stub.ListNodes, coordinator_pb2.ListNodesRequest()
        )
        return list(response.nodes)

    def drain(self, node_id: str, undrain: bool = False) -> coordinator_pb2.DrainNodeResponse:
        result: coordinator_pb2.DrainNodeResponse = self._call(
            self._stub.DrainNode, coordinator_pb2.DrainNodeRequest(node_id=node_id, undrain=undrain)
        )
        return result

    def close(self) -> None:
        self._channel.close()
