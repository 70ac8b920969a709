"""Health monitoring of each node: a Watch stream and active Checks with a deadline.

The Watch stream reports a change at once (and breaks at once when the process dies); the
periodic Check catches what a stream cannot: a frozen process keeps its socket open but stops
answering, and only a deadline notices. Each probe also refreshes the node's reported load.
The monitor turns what it hears into reports to the registry, which owns the verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import grpc

from coordinator import clock
from coordinator.node_client import IDENTITY_MISMATCH, SERVING, NodeCallError
from coordinator.registry import UNHEALTHY, Node, Registry
from omni_rpc import config
from omni_rpc.backoff import Backoff
from omni_rpc.logging import get_logger

log = get_logger("coordinator.health")

# A check that fails this way means the node cannot be reached (or is frozen).
_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def _impostor(exc: NodeCallError) -> bool:
    """The process at the node's address is not the node (the agent checks the node id and
    incarnation each call carries)."""
    return exc.code == grpc.StatusCode.FAILED_PRECONDITION and exc.details.startswith(
        IDENTITY_MISMATCH
    )


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
            try:
                async with contextlib.aclosing(node.client.watch()) as statuses:
                    async for status in statuses:
                        backoff.reset()
                        self.registry.report_watch(
                            node, status == SERVING, f"health watch: {status}"
                        )
                reason = "health watch stream ended"
            except NodeCallError as exc:
                if _impostor(exc):
                    self.registry.report_impostor(node, exc.details)
                    return
                reason = f"health watch stream broke: {exc.code.name}"
            # The stream only breaks when the connection does: the process is gone or cut off.
            self.registry.report_unreachable(node, reason)
            await backoff.sleep()

    async def _check_loop(self, node: Node) -> None:
        # Healthy nodes are checked every interval; unhealthy ones are re-probed sooner, with
        # backoff, so a recovered node comes back quickly and a dead one costs little.
        backoff = Backoff(config.PROBE_BACKOFF_BASE_S, self.interval_s)
        while True:
            # Cleared before the probe, not after: a request to probe at once that arrives
            # while this probe is in flight (a failed request) gets a probe right after it.
            node.probe_now.clear()
            await self.probe(node)
            if node.verdict == UNHEALTHY:
                wait_s = backoff.next_ceiling()
            else:
                backoff.reset()
                wait_s = self.interval_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(node.probe_now.wait(), wait_s)

    async def probe(self, node: Node) -> None:
        """One active Check (with a deadline) plus a load refresh."""
        started = clock.now()
        try:
            status = await self._check(node)
            load = await node.client.load(self.timeout_s * config.PROBE_CONFIRM_TIMEOUTS)
        except NodeCallError as exc:
            node.last_health_check_at = time.time()
            reason = f"health check failed: {exc.code.name} {exc.details}".strip()
            if _impostor(exc):
                self.registry.report_impostor(node, exc.details)
            elif exc.code in _UNREACHABLE:
                self.registry.report_unreachable(node, reason)
            else:
                self.registry.report_probe(node, False, False, reason)
            return
        node.last_health_check_at = time.time()
        elapsed = clock.now() - started
        node.health_check_latency_ms = elapsed * 1000.0
        if self.observe_probe is not None:
            self.observe_probe(elapsed)
        node.record_load(load)
        self.registry.report_probe(
            node, status == SERVING, load.draining, f"health check: {status}"
        )

    async def _check(self, node: Node) -> str:
        """A Check that tells "slow" from "no answer": past the timeout the node gets no new
        work, but it is found unreachable (ejected, its streams failed over) only when the
        answer is still missing after PROBE_CONFIRM_TIMEOUTS timeouts. A host under CPU load
        answers late; a frozen or cut-off one does not answer at all."""
        call = asyncio.ensure_future(
            node.client.check(self.timeout_s * config.PROBE_CONFIRM_TIMEOUTS)
        )
        try:
            done, _ = await asyncio.wait({call}, timeout=self.timeout_s)
            if not done:
                self.registry.set_suspect(node, True)
            return await call
        finally:
            if not call.done():
                call.cancel()
            elif not call.cancelled():
                call.exception()  # seen: a probe given up by its caller must not log it
