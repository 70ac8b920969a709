"""Health monitoring of each node: a Watch stream and active Checks with a deadline.

The Watch stream reports a change at once (and breaks at once when the process dies); the
periodic Check catches what a stream cannot: a frozen process keeps its socket open but stops
answering, and only a deadline notices. Each probe also refreshes the node's reported load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2

from coordinator.registry import UNHEALTHY, Node, Registry
from omni_rpc import config
from omni_rpc.backoff import Backoff
from omni_rpc.logging import get_logger
from omni_rpc.v1 import node_agent_pb2, node_pb2

log = get_logger("coordinator.health")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_REQUEST = health_pb2.HealthCheckRequest(service=config.NODE_AGENT_SERVICE)
# A check that fails this way means the node cannot be reached (or is frozen).
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


class HealthMonitor:
    """Runs two tasks per registered node; started and stopped by registry events."""

    def __init__(
        self,
        registry: Registry,
        interval_s: float,
        timeout_s: float,
        observe_probe: Callable[[float], None] | None = None,
    ) -> None:
        self.observe_probe = observe_probe
        self.registry = registry
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._tasks: dict[int, list[asyncio.Task[None]]] = {}
        registry.on_added.append(self.start)
        registry.on_removed.append(self.stop)

    def start(self, node: Node) -> None:
        self._tasks[id(node)] = [
            asyncio.create_task(self._watch(node), name=f"watch:{node.node_id}"),
            asyncio.create_task(self._check_loop(node), name=f"check:{node.node_id}"),
        ]

    def stop(self, node: Node) -> None:
        for task in self._tasks.pop(id(node), []):
            task.cancel()

    async def _watch(self, node: Node) -> None:
        backoff = Backoff(config.PROBE_BACKOFF_BASE_S, self.interval_s)
        while True:
            call = node.health.Watch(_REQUEST)
            try:
                async for response in call:
                    backoff.reset()
                    serving = response.status == _SERVING
                    self.registry.report_watch(
                        node, serving, f"health watch: {_status_name(response.status)}"
                    )
                reason = "health watch stream ended"
            except grpc.aio.AioRpcError as exc:
                reason = f"health watch stream broke: {exc.code().name}"
            finally:
                call.cancel()
            # The stream only breaks when the connection does: the process is gone or cut off.
            self.registry.report_unreachable(node, reason)
            await backoff.sleep()

    async def _check_loop(self, node: Node) -> None:
        # Healthy nodes are checked every interval; unhealthy ones are re-probed sooner, with
        # backoff, so a recovered node comes back quickly and a dead one costs little.
        backoff = Backoff(config.PROBE_BACKOFF_BASE_S, self.interval_s)
        while True:
            await self.probe(node)
            if node.verdict == UNHEALTHY:
                wait_s = backoff.next_ceiling()
            else:
                backoff.reset()
                wait_s = self.interval_s
            node.probe_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.probe_now.wait(), wait_s)

    async def probe(self, node: Node) -> None:
        """One active Check (with a deadline) plus a load refresh."""
        started = time.monotonic()
        try:
            response = await node.health.Check(_REQUEST, timeout=self.timeout_s)
            load: node_pb2.NodeLoad = await node.agent.GetLoad(
                node_agent_pb2.GetLoadRequest(), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            node.last_health_check_at = time.time()
            reason = f"health check failed: {exc.code().name} {exc.details() or ''}".strip()
            if exc.code() in _UNREACHABLE:
                self.registry.report_unreachable(node, reason)
            else:
                self.registry.report_probe(node, False, False, reason)
            return
        node.last_health_check_at = time.time()
        elapsed = time.monotonic() - started
        node.health_check_latency_ms = elapsed * 1000.0
        if self.observe_probe is not None:
            self.observe_probe(elapsed)
        node.load = load
        self.registry.report_probe(
            node,
            response.status == _SERVING,
            load.draining,
            f"health check: {_status_name(response.status)}",
        )


def _status_name(status: int) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return name
