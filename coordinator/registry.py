"""The node registry: who is in the cluster, how to reach them, and what state each is in.

A node's state is derived from three facts kept separately, so that no event can undo
another by accident: its last health verdict (JOINING until the first answer, then HEALTHY
or UNHEALTHY), whether an operator drained it, and whether it left.

The set of dispatchable nodes and their total capacity are kept up to date on every state
change (not recomputed per request): the balancer and admission read them on the hot path.
Nodes are reached through a ``NodeClient`` made by the registry's ``Connector``; the registry
itself never touches the network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator import clock
from coordinator.circuit import BreakerPolicy, CircuitBreaker
from coordinator.node_client import Connector, NodeClient
from omni_rpc import config
from omni_rpc.logging import get_logger
from omni_rpc.v1 import coordinator_pb2, node_pb2, registry_pb2

log = get_logger("coordinator.registry")

NodeState = coordinator_pb2.NodeState
JOINING = coordinator_pb2.NODE_STATE_JOINING
HEALTHY = coordinator_pb2.NODE_STATE_HEALTHY
UNHEALTHY = coordinator_pb2.NODE_STATE_UNHEALTHY
DRAINING = coordinator_pb2.NODE_STATE_DRAINING
LEFT = coordinator_pb2.NODE_STATE_LEFT


def state_name(state: int) -> str:
    return coordinator_pb2.NodeState.Name(state).removeprefix("NODE_STATE_").lower()  # type: ignore[arg-type]


@dataclass(eq=False)
class Node:
    info: registry_pb2.JoinRequest
    client: NodeClient
    joined_at: float = field(default_factory=time.time)
    # Health verdict: JOINING, HEALTHY or UNHEALTHY.
    verdict: int = JOINING
    drained: bool = False
    left: bool = False
    state_reason: str = "joined"
    state_since: float = field(default_factory=time.time)
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(BreakerPolicy()))
    # The agent itself is draining (it said so in its load report).
    self_draining: bool = False
    # Consecutive passing probes while unhealthy (re-admission needs READMIT_AFTER_PROBES).
    good_probes: int = 0
    in_flight: int = 0
    dispatched: int = 0
    served: int = 0
    failures: int = 0
    last_error: str = ""
    load: node_pb2.NodeLoad | None = None
    # This process's in-flight requests on the node when ``load`` arrived: the report's
    # ``requests`` less these are the other coordinators' (and workers') requests there.
    in_flight_at_report: int = 0
    # ``load`` came on the node's session (frequent) rather than with a health check.
    load_via_session: bool = False
    last_health_check_at: float = 0.0
    health_check_latency_ms: float = 0.0
    # Set when dispatch saw a node-level failure: the health monitor probes at once.
    probe_now: asyncio.Event = field(default_factory=asyncio.Event)
    # Called with a reason when the node is found unreachable: streams on it are cancelled.
    lost_hooks: set[Callable[[str], None]] = field(default_factory=set)
    # A health check is late: no new work until it answers (or the node is found unreachable).
    suspect: bool = False
    # Has been healthy at least once: only then does its model count as served (a join that
    # never answered, e.g. from a wrong address, does not add a model).
    admitted: bool = False
    # Monotonic time the node was last found unreachable without answering since (None: it
    # answers); past --forget-after the node is forgotten.
    unreachable_since: float | None = None
    # Flap damping: when it was last re-admitted, its relapses soon after a re-admission in
    # a row, and until when passing probes may not re-admit it (monotonic seconds).
    readmitted_at: float = 0.0
    flaps: int = 0
    held_until: float = 0.0
    # What this node usually takes (EWMA over successful attempts, 0: not known yet): to its
    # first output, and its longest gap between outputs. Stall bounds are derived from them.
    usual_first_output_s: float = 0.0
    usual_gap_s: float = 0.0

    @property
    def consecutive_failures(self) -> int:
        return self.breaker.consecutive_failures

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def capacity(self) -> int:
        return self.info.capacity

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names requests may route to this node by: its model, then its aliases."""
        return tuple(dict.fromkeys((self.info.model, *self.info.model_aliases)))

    def takes(self, inputs: frozenset[str], outputs: frozenset[str]) -> bool:
        """Whether its model takes every modality of ``inputs`` and produces every one of
        ``outputs`` (besides text, which every model takes and produces)."""
        return inputs.issubset(self.info.input_modalities) and outputs.issubset(
            self.info.output_modalities
        )

    @property
    def kv_cache_usage(self) -> float:
        return self.load.kv_cache_usage if self.load is not None else 0.0

    @property
    def cache_block_tokens(self) -> int:
        return self.info.cache_block_tokens

    @property
    def cache_capacity_tokens(self) -> int:
        return self.info.cache_capacity_tokens

    @property
    def others_in_flight(self) -> int:
        """Requests others (other coordinators, other workers) had on the node at its last
        load report: what least-loaded balancing adds to this process's own."""
        if self.load is None:
            return 0
        return max(0, self.load.requests - self.in_flight_at_report)

    def record_load(self, load: node_pb2.NodeLoad, via_session: bool = False) -> None:
        self.load = load
        self.in_flight_at_report = self.in_flight
        self.load_via_session = self.load_via_session or via_session

    @property
    def state(self) -> int:
        if self.left:
            return LEFT
        if self.drained or self.self_draining:
            return DRAINING
        return self.verdict

    @property
    def dispatchable(self) -> bool:
        return self.state == HEALTHY and not self.suspect

    def to_proto(self) -> coordinator_pb2.NodeInfo:
        info = coordinator_pb2.NodeInfo(
            node_id=self.node_id,
            address=self.address,
            model=self.info.model,
            engine=self.info.engine,
            state=self.state,  # type: ignore[arg-type]
            state_reason=self.state_reason,
            capacity=self.capacity,
            gpu=self.info.gpu,
            version=self.info.version,
            in_flight=self.in_flight,
            dispatched=self.dispatched,
            served=self.served,
            failures=self.failures,
            consecutive_failures=self.consecutive_failures,
            last_error=self.last_error,
            joined_at=self.joined_at,
            state_since=self.state_since,
            last_health_check_at=self.last_health_check_at,
            health_check_latency_ms=self.health_check_latency_ms,
            ejections=self.breaker.ejections,
            ejected_until=clock.to_wall(self.breaker.ejected_until)
            if self.breaker.ejections
            else 0.0,
            placement=self.info.placement,
            model_aliases=self.info.model_aliases,
            input_modalities=self.info.input_modalities,
            output_modalities=self.info.output_modalities,
            cache_block_tokens=self.info.cache_block_tokens,
            cache_capacity_tokens=self.info.cache_capacity_tokens,
        )
        if self.load is not None:
            info.load.CopyFrom(self.load)
        return info


NodeListener = Callable[[Node], None]
# Hears that a node was found unreachable (``Registry.report_unreachable``), with the reason.
LostListener = Callable[[Node, str], None]


class Registry:
    """All known nodes, by id. Listeners hear of nodes added and removed (health monitors)."""

    def __init__(
        self,
        connect: Connector,
        breaker_policy: BreakerPolicy | None = None,
        readmit_after: int = config.READMIT_AFTER_PROBES,
        forget_after_s: float = config.FORGET_AFTER_S,
        flap_hold_s: float = config.FLAP_BASE_HOLD_S,
        flap_max_hold_s: float = config.FLAP_MAX_HOLD_S,
    ) -> None:
        self.connect = connect
        self.breaker_policy = breaker_policy or BreakerPolicy()
        self.readmit_after = readmit_after
        # 0: never forget an unreachable node.
        self.forget_after_s = forget_after_s
        # A flapping node's first hold-down (doubling per flap up to the max); 0: no damping.
        self.flap_hold_s = flap_hold_s
        self.flap_max_hold_s = flap_max_hold_s
        self.nodes: dict[str, Node] = {}
        # Derived from ``nodes`` on every change: the dispatchable nodes in id order, and the
        # sum of their capacities (at least 1 each: a node that reports none still runs one).
        self._dispatchable: tuple[Node, ...] = ()
        # The dispatchable nodes by every model name they serve (model and aliases), in id order.
        self._by_model: dict[str, tuple[Node, ...]] = {}
        # Every model the admitted nodes serve (healthy now or not): their own names, and every
        # name (aliases too) a request may use.
        self.models: tuple[str, ...] = ()
        self.model_names: frozenset[str] = frozenset()
        # The admitted nodes (healthy now or not) by every model name they serve: what a
        # request for the model could ever be served by (routing by modality asks it).
        self._serving: dict[str, tuple[Node, ...]] = {}
        self.capacity = 0
        self.on_added: list[NodeListener] = []
        # Every node reports its load on its session (what other coordinators put on it).
        self.on_added.append(_listen_for_load)
        self.on_removed: list[NodeListener] = []
        self.on_ejected: list[NodeListener] = []
        # Any change of what a node is (joined, refreshed with new facts, state changed,
        # removed): the control process of a multi-worker coordinator pushes it to its workers.
        self.on_changed: list[NodeListener] = []
        # A node found unreachable: its streams are lost (in every process that has some).
        self.on_lost: list[LostListener] = []
        # Set (and replaced) whenever a node becomes dispatchable: wakes waiting requests.
        self._available = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()

    def dispatchable(
        self,
        model: str = "",
        inputs: frozenset[str] = frozenset(),
        outputs: frozenset[str] = frozenset(),
    ) -> tuple[Node, ...]:
        """The nodes that take new work now, in node id order; with ``model``, only those
        serving it (by its name or an alias); with ``inputs`` or ``outputs`` (media
        modalities), only those whose model takes and produces them (``Node.takes``)."""
        nodes = self._by_model.get(model, ()) if model else self._dispatchable
        if inputs or outputs:
            return tuple(n for n in nodes if n.takes(inputs, outputs))
        return nodes

    def serving(self, model: str = "") -> tuple[Node, ...]:
        """The admitted nodes (healthy now or not) serving ``model`` ("": any model)."""
        if model:
            return self._serving.get(model, ())
        return tuple(n for nodes in self._serving.values() for n in nodes)

    def _refresh(self) -> None:
        ready = sorted((n for n in self.nodes.values() if n.dispatchable), key=_by_id)
        self._dispatchable = tuple(ready)
        self.capacity = sum(max(1, n.capacity) for n in ready)
        by_model: dict[str, list[Node]] = {}
        for node in ready:
            for name in node.model_names:
                by_model.setdefault(name, []).append(node)
        self._by_model = {name: tuple(nodes) for name, nodes in by_model.items()}
        for node in ready:
            node.admitted = True
        serving = [n for n in self.nodes.values() if n.admitted and not n.left]
        self.models = tuple(sorted({n.info.model for n in serving} - {""}))
        self.model_names = frozenset(name for n in serving for name in n.model_names if name)
        by_name: dict[str, list[Node]] = {}
        for node in sorted(serving, key=_by_id):
            for name in node.model_names:
                by_name.setdefault(name, []).append(node)
        self._serving = {name: tuple(nodes) for name, nodes in by_name.items()}

    def join(self, request: registry_pb2.JoinRequest) -> tuple[Node, bool]:
        """Register or refresh a node; returns (node, whether it is new)."""
        known = self.nodes.get(request.node_id)
        if known is not None and same_process(known.info, request):
            # A refresh: the agent's other facts may have changed (capacity, version).
            if known.info != request:  # most refreshes change nothing: nothing to redo
                known.info = request
                self._refresh()
                self._changed(known)
            return known, False
        if known is not None:
            restarted = known.address == request.address
            log.info(
                "node restarted, replacing it"
                if restarted
                else "node re-joined from a new address, replacing it",
                node_id=request.node_id,
                old_address=known.address,
                address=request.address,
                old_incarnation=known.info.incarnation,
                incarnation=request.incarnation,
            )
            self.remove(
                known,
                "replaced by its restarted agent (a new incarnation)"
                if restarted
                else "replaced by a re-join from a new address",
            )
        node = Node(
            info=request,
            client=self.connect(request),
            breaker=CircuitBreaker(self.breaker_policy),
        )
        self.nodes[node.node_id] = node
        log.info(
            "node joined",
            node_id=node.node_id,
            address=node.address,
            engine=request.engine,
            model=request.model,
            capacity=request.capacity,
        )
        for listener in self.on_added:
            listener(node)
        self._changed(node)
        return node, True

    def remove(self, node: Node, reason: str) -> None:
        if self.nodes.get(node.node_id) is node:
            del self.nodes[node.node_id]
        # LEFT is a new state for a registered node: the transition refreshes the derived set.
        self._transition(node, reason, lambda: setattr(node, "left", True))
        for listener in self.on_removed:
            listener(node)
        # Streams still open on the node are lost: their relays fail over (and resume) instead
        # of seeing a bare cancellation when the channel closes below.
        for hook in list(node.lost_hooks):
            hook(f"node removed: {reason}")
        # Closing cancels in-flight calls on the connection: callers see them fail.
        task = asyncio.create_task(node.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def takeover_problem(self, request: registry_pb2.JoinRequest) -> str:
        """Why ``request`` may not take its node id, if another live node holds it.

        A healthy node keeps its id against joins from other addresses (a second process
        started with the same id, or an impostor); once it is unhealthy (a restarted agent's
        old self is gone) the id may move to the new address.
        """
        known = self.nodes.get(request.node_id)
        if known is None or known.address == request.address or known.verdict != HEALTHY:
            return ""
        return (
            f"node id {request.node_id!r} is held by a healthy node at {known.address}; "
            "it can move only once that node is gone"
        )

    def leave(self, node_id: str, reason: str, address: str = "") -> bool:
        """Remove ``node_id``; with ``address``, only if the node registered from there."""
        node = self.nodes.get(node_id)
        if node is None or (address and node.address != address):
            return False
        self.remove(node, f"left: {reason}" if reason else "left")
        return True

    def report_watch(self, node: Node, serving: bool, reason: str) -> None:
        """A status pushed by the node's Watch stream."""
        node.unreachable_since = None
        if serving and node.verdict == JOINING:
            self._set_verdict(node, HEALTHY, reason)
        elif not serving:
            # Engine dead or agent draining: no new work now; a probe tells which.
            self._mark_unhealthy(node, reason)
        node.probe_now.set()

    def report_probe(self, node: Node, serving: bool, draining: bool, reason: str) -> None:
        """The outcome of an active Check (with the load report that came with it)."""
        node.unreachable_since = None
        self.set_suspect(node, False)
        if draining != node.self_draining:
            self._transition(
                node,
                "agent is draining" if draining else "agent stopped draining",
                lambda: setattr(node, "self_draining", draining),
            )
        if not serving:
            node.good_probes = 0
            if not draining:
                self._mark_unhealthy(node, reason)
            return
        if node.verdict == JOINING:
            self._set_verdict(node, HEALTHY, reason)
        elif node.verdict == UNHEALTHY:
            now = clock.now()
            if node.breaker.is_open(now) or now < node.held_until:
                node.good_probes = 0
                return
            node.good_probes += 1
            if node.good_probes >= self.readmit_after:
                node.readmitted_at = now
                self._set_verdict(
                    node, HEALTHY, f"{node.good_probes} consecutive passing health checks"
                )

    def report_unreachable(self, node: Node, reason: str) -> None:
        """The node does not answer (stream broke, check deadline): eject, cancel its streams.

        A node unreachable for longer than ``forget_after_s`` is forgotten."""
        now = clock.now()
        if node.unreachable_since is None:
            node.unreachable_since = now
        elif self.forget_after_s and now - node.unreachable_since >= self.forget_after_s:
            self.remove(
                node, f"forgotten: unreachable for {now - node.unreachable_since:.0f}s ({reason})"
            )
            return
        node.suspect = False
        self._mark_unhealthy(node, reason)
        for hook in list(node.lost_hooks):
            hook(reason)
        for listener in self.on_lost:
            listener(node, reason)

    def report_impostor(self, node: Node, reason: str) -> None:
        """Another process answers at the node's address (an identity check failed): the node
        registered there is gone. Its streams fail over; the other process, if it is an agent,
        joins under its own identity."""
        self.remove(node, f"gone: a different process answers at its address: {reason}")

    def set_suspect(self, node: Node, suspect: bool) -> None:
        """A late health check: no new work for the node until it answers (not an ejection:
        its streams go on, and an answer makes it dispatchable again at once)."""
        if node.suspect == suspect:
            return
        node.suspect = suspect
        if suspect:
            log.info(
                "node is slow to answer a health check: no new work until it does",
                node_id=node.node_id,
            )
        self._refresh()
        if node.dispatchable:
            self._wake()

    def eject(self, node: Node, verdict: str, detail: str) -> None:
        """Take a healthy node out of rotation for its breaker's growing ejection time (an
        outlier verdict other than failures, e.g. latency); passing probes re-admit it after."""
        if node.verdict != HEALTHY:
            return
        self._eject(node, node.breaker.eject(clock.now()), verdict, detail)

    def _eject(self, node: Node, ejected_s: float, verdict: str, detail: str) -> None:
        for listener in self.on_ejected:
            listener(node)
        node.good_probes = 0
        self._set_verdict(
            node,
            UNHEALTHY,
            f"{verdict} (ejection #{node.breaker.ejections}, {ejected_s:g}s): {detail}",
        )

    def _mark_unhealthy(self, node: Node, reason: str) -> None:
        """A failed probe or a lost connection. A healthy node that relapses soon after being
        re-admitted is flapping: it is held out for a growing time before probes may re-admit
        it (forgiven once it stays up long enough)."""
        node.good_probes = 0
        if node.verdict == HEALTHY and node.readmitted_at and self.flap_hold_s:
            now = clock.now()
            up_s = now - node.readmitted_at
            if up_s >= config.FLAP_FORGIVE_S:
                node.flaps = 0
            elif up_s < config.FLAP_WINDOW_S:
                node.flaps += 1
                hold_s = min(self.flap_max_hold_s, self.flap_hold_s * 2 ** (node.flaps - 1))
                node.held_until = now + hold_s
                reason = (
                    f"{reason} (flapping: relapse #{node.flaps} within {up_s:.1f}s of "
                    f"re-admission, held out {hold_s:g}s)"
                )
        self._set_verdict(node, UNHEALTHY, reason)

    def record_success(self, node: Node) -> None:
        node.served += 1
        node.breaker.record_success()

    def record_failure(self, node: Node, error: str, unreachable: bool) -> None:
        """A node-level failure of a real request (passive health signal)."""
        node.failures += 1
        node.last_error = error
        if node.verdict != HEALTHY:
            # Already out of rotation (frozen, engine dead, ejected): the streams it had in
            # flight fail together, and that is one incident, not many for the breaker.
            node.probe_now.set()
            return
        ejected_s = node.breaker.record_failure(clock.now())
        if ejected_s:
            self._eject(
                node,
                ejected_s,
                f"circuit breaker open after {self.breaker_policy.threshold} consecutive failures",
                error,
            )
        elif unreachable:
            # Likely gone: stop sending it work now; a probe re-admits it if it answers.
            self._mark_unhealthy(node, f"request failed: {error}")
        node.probe_now.set()

    def _set_verdict(self, node: Node, verdict: int, reason: str) -> None:
        if node.verdict != verdict:
            self._transition(node, reason, lambda: setattr(node, "verdict", verdict))

    def set_drained(self, node: Node, drained: bool) -> None:
        if node.drained == drained:
            return
        reason = "drained by operator" if drained else "undrained by operator"
        self._transition(node, reason, lambda: setattr(node, "drained", drained))

    def set_state(
        self, node: Node, *, verdict: int, drained: bool, self_draining: bool, reason: str
    ) -> None:
        """Take a node's three facts as another process decided them (a worker's replica
        applies the control process's pushed state this way): one transition, logged once."""

        def change() -> None:
            node.verdict = verdict
            node.drained = drained
            node.self_draining = self_draining

        self._transition(node, reason, change)

    def _changed(self, node: Node) -> None:
        for listener in self.on_changed:
            listener(node)

    def _transition(self, node: Node, reason: str, change: Callable[[], object]) -> None:
        before = node.state
        change()
        after = node.state
        if before == after:
            return
        node.state_reason = reason
        node.state_since = time.time()
        self._refresh()
        log.info(
            "node state changed",
            node_id=node.node_id,
            old_state=state_name(before),
            new_state=state_name(after),
            reason=reason,
        )
        if node.dispatchable:
            self._wake()
        self._changed(node)

    def _wake(self) -> None:
        self._available.set()
        self._available = asyncio.Event()

    async def wait_available(self, timeout_s: float) -> None:
        """Return when some node becomes dispatchable, or after ``timeout_s``."""
        event = self._available
        try:
            await asyncio.wait_for(event.wait(), max(0.0, timeout_s))
        except TimeoutError:
            pass

    async def close(self) -> None:
        for node in list(self.nodes.values()):
            for listener in self.on_removed:
                listener(node)
            await node.client.close()
        self.nodes.clear()
        self._refresh()


def _by_id(node: Node) -> str:
    return node.node_id


def same_process(known: registry_pb2.JoinRequest, joining: registry_pb2.JoinRequest) -> bool:
    """Whether a join comes from the process already registered: same address, and the same
    incarnation (an agent that restarted at the same address is a new process)."""
    return known.address == joining.address and known.incarnation == joining.incarnation


def _listen_for_load(node: Node) -> None:
    node.client.report_load(lambda load: node.record_load(load, via_session=True))
