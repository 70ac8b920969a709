"""A worker's replica of the control process's registry (``omni-coordinator --workers N``).

The control process owns the registry: joins, leaves, health verdicts, drains and the circuit
breaker. Each worker dispatches from a ``ReplicaRegistry`` built from the snapshots the control
process pushes (``apply``), with a connection of its own to every node. What the dispatcher
learns of a node is sent back as a ``NodeReport`` through ``report`` (the worker's Attach
stream): every node-level failure, and the first success after one (it resets the breaker's
consecutive count; other successes are not sent). An unreachable failure also takes the node
out of this worker's rotation at once, until the control process has processed that report and
pushed the state it decided (``ClusterSnapshot.reports_seen``).
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator.circuit import BreakerPolicy, CircuitBreaker
from coordinator.node_client import Connector
from coordinator.registry import HEALTHY, UNHEALTHY, Node, Registry, same_process
from coordinator.stats import NodeCounters
from omni_rpc.logging import get_logger
from omni_rpc.v1 import control_pb2

log = get_logger("coordinator.replica")

Reporter = Callable[[control_pb2.NodeReport], None]


class ReplicaRegistry(Registry):
    def __init__(self, connect: Connector, report: Reporter | None = None) -> None:
        # Nodes are forgotten by the control process (its snapshots), never by a replica.
        super().__init__(connect, BreakerPolicy(), forget_after_s=0)
        self.report = report or (lambda _: None)
        self.version = 0
        self._report_id = 0
        # Nodes this worker took out of rotation itself (unreachable), by id: the report's id.
        # Held until a snapshot says the control process has processed that report.
        self._held: dict[str, int] = {}
        # Nodes with a failure reported since their last reported success.
        self._failed_since_success: set[str] = set()

    # -- what the control process pushes -------------------------------------------------------

    def apply(self, snapshot: control_pb2.ClusterSnapshot) -> None:
        """Make this registry what ``snapshot`` says: nodes added, updated and removed."""
        if snapshot.version <= self.version:
            return
        self.version = snapshot.version
        self._held = {
            node_id: report_id
            for node_id, report_id in self._held.items()
            if report_id > snapshot.reports_seen
        }
        present = set()
        for pushed in snapshot.nodes:
            present.add(pushed.info.node_id)
            node = self.nodes.get(pushed.info.node_id)
            if node is not None and not same_process(node.info, pushed.info):
                self.remove(node, "replaced by a re-join (a new address or incarnation)")
                node = None
            if node is None:
                node = Node(
                    info=pushed.info,
                    client=self.connect(pushed.info),
                    breaker=CircuitBreaker(self.breaker_policy),
                    joined_at=pushed.joined_at,
                )
                self.nodes[node.node_id] = node
                for listener in self.on_added:
                    listener(node)
            elif node.info != pushed.info:
                node.info = pushed.info
                self._refresh()
            if pushed.HasField("load") and not node.load_via_session:
                # The node's own reports on this worker's session are fresher.
                node.record_load(pushed.load)
            verdict = pushed.verdict
            if verdict == HEALTHY and node.node_id in self._held:
                verdict = UNHEALTHY
            self.set_state(
                node,
                verdict=verdict,
                drained=pushed.drained,
                self_draining=pushed.self_draining,
                reason=pushed.state_reason,
            )
        for node in [n for n in self.nodes.values() if n.node_id not in present]:
            self.remove(node, "removed by the control process")

    def lost(self, event: control_pb2.NodeLost) -> None:
        """The control process found the node unreachable: its streams here are lost too."""
        node = self.nodes.get(event.node_id)
        if node is not None and node.address == event.address:
            self.report_unreachable(node, event.reason)

    # -- what the dispatcher learns ------------------------------------------------------------

    def record_success(self, node: Node) -> None:
        node.served += 1
        if node.node_id in self._failed_since_success:
            # The control process's breaker counts consecutive failures: reset it once.
            self._failed_since_success.discard(node.node_id)
            self._send(node, success=True)

    def record_failure(self, node: Node, error: str, unreachable: bool) -> None:
        node.failures += 1
        node.last_error = error
        self._failed_since_success.add(node.node_id)
        report_id = self._send(node, success=False, error=error, unreachable=unreachable)
        if unreachable and node.verdict == HEALTHY:
            # Likely gone: no new work from this worker until the control process decides.
            self._held[node.node_id] = report_id
            self._set_verdict(node, UNHEALTHY, f"request failed: {error}")

    def eject(self, node: Node, verdict: str, detail: str) -> None:
        """A latency outlier found by this worker's dispatcher: the control process ejects it
        (and pushes the new state)."""
        self._send(node, success=False, error=detail, outlier=True)

    def _send(
        self,
        node: Node,
        *,
        success: bool,
        error: str = "",
        unreachable: bool = False,
        outlier: bool = False,
    ) -> int:
        self._report_id += 1
        self.report(
            control_pb2.NodeReport(
                report_id=self._report_id,
                node_id=node.node_id,
                address=node.address,
                success=success,
                error=error,
                unreachable=unreachable,
                outlier=outlier,
            )
        )
        return self._report_id

    def counters(self) -> list[control_pb2.NodeCounters]:
        return [
            control_pb2.NodeCounters(
                node_id=n.node_id,
                address=n.address,
                in_flight=n.in_flight,
                dispatched=n.dispatched,
                served=n.served,
            )
            for n in self.nodes.values()
        ]


def node_counters(
    pushed: list[control_pb2.NodeCounters],
) -> dict[tuple[str, str], NodeCounters]:
    return {
        (c.node_id, c.address): NodeCounters(c.in_flight, c.dispatched, c.served) for c in pushed
    }
