"""Dispatch: run one Generate call across nodes until it succeeds or must fail.

Each attempt relays one node's bidirectional stream to the client. Failures are classified:
node-level errors fail over to another node (and count against the node), RESOURCE_EXHAUSTED
tries elsewhere without blaming the node, request errors go straight back to the client.
A stream that already delivered output is resumed on the next node from the delivered tokens.
Attempts are spaced by full-jitter backoff and all of it happens inside the caller's deadline,
which is passed on to each agent call explicitly (gRPC Python does not propagate it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import grpc

from coordinator import clock
from coordinator.balancer import Balancer
from coordinator.node_client import NodeCallError, OutputOverflow
from coordinator.outliers import LATENCY_OUTLIER, LatencyOutliers
from coordinator.prefix import RequestPrefix
from coordinator.registry import HEALTHY, Node, Registry
from coordinator.stalls import StallPolicy, StallWatch, learn
from omni_rpc import config
from omni_rpc.backoff import Backoff
from omni_rpc.logging import get_logger
from omni_rpc.metrics import CoordinatorMetrics
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from omni_rpc.validation import (
    chat_text_bytes,
    input_modalities,
    modality_problem,
    output_modalities,
)

# Deferred: its lines (one per request, and one per failover) are written off the event loop.
log = get_logger("coordinator.dispatch", deferred=True)


class Failure(enum.Enum):
    NODE = "node"  # the node is at fault: fail over, count against it
    BUSY = "busy"  # the node is full: try another, node is fine
    REQUEST = "request"  # the request is at fault: return to the client


_REQUEST_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}


def classify(code: grpc.StatusCode) -> Failure:
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Failure.BUSY
    if code in _REQUEST_ERRORS:
        return Failure.REQUEST
    return Failure.NODE


class DispatchError(Exception):
    """The call ends with this status; the service turns it into the RPC's status."""

    def __init__(self, code: grpc.StatusCode, message: str, caller_deadline: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # The caller's own deadline ended it while a node was serving it: the caller stopped
        # waiting (counted with cancellations), the cluster did not fail it.
        self.caller_deadline = caller_deadline


@dataclass
class AttemptError(Exception):
    node_id: str
    code: grpc.StatusCode
    details: str
    kind: Failure = field(init=False)

    def __post_init__(self) -> None:
        self.kind = classify(self.code)

    def __str__(self) -> str:
        return f"{self.node_id}: {self.code.name} {self.details}".strip()


@dataclass
class DispatchCounters:
    requests_total: int = 0
    requests_succeeded: int = 0
    requests_failed: int = 0
    retries_total: int = 0
    resumes_total: int = 0
    in_flight: int = 0
    # The client went away (cancelled, or its own deadline) before the request ended.
    requests_cancelled: int = 0


@dataclass
class Delivered:
    """What the client has received so far: the point a failover resumes from."""

    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    # Media output items relayed whole (0 .. n-1): a failover resumes after them.
    media_items: int = 0


@dataclass(frozen=True)
class Route:
    """What picks the nodes of a request: its model ("": any node) and the media modalities
    its nodes must take (``inputs``) and produce (``outputs``) besides text."""

    model: str = ""
    inputs: frozenset[str] = frozenset()
    outputs: frozenset[str] = frozenset()


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        balancer: Balancer,
        max_retries: int,
        *,
        no_node_wait_s: float = config.NO_NODE_WAIT_S,
        metrics: CoordinatorMetrics | None = None,
        log_prompts: bool = False,
        stream_interval: int = config.DEFAULT_STREAM_INTERVAL,
        stall_policy: StallPolicy | None = None,
        outliers: LatencyOutliers | None = None,
        max_held_media_bytes: int = config.MAX_HELD_MEDIA_BYTES,
    ) -> None:
        self.metrics = metrics or CoordinatorMetrics()
        # The most media bytes held for one request until its item completes.
        self.max_held_media_bytes = max_held_media_bytes
        # Prompts are user data: they reach the logs only when the operator asks.
        self.log_prompts = log_prompts
        self.registry = registry
        self.balancer = balancer
        self.max_retries = max_retries
        self.no_node_wait_s = no_node_wait_s
        # For requests that do not set their own; the agents and the relay read the field.
        self.stream_interval = stream_interval
        self.counters = DispatchCounters()
        # Latency per output token of every successful attempt, judged every
        # OUTLIER_INTERVAL_S on the stall watch's timer (None: no outlier ejection).
        self.outliers = outliers
        self._next_outlier_check = 0.0
        if outliers is not None:
            # A node that is gone (or replaced by a new incarnation) is judged afresh.
            registry.on_removed.append(lambda node: outliers.forget(node.node_id))
        self.stalls = StallWatch(stall_policy or StallPolicy(), on_tick=self._judge_outliers)

    async def generate(
        self, request: generate_pb2.GenerateRequest, time_remaining: float | None
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        """Stream the responses of ``request``; raise DispatchError when it cannot be served."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if self.stream_interval != 1 and not request.HasField("stream_interval"):
            request.stream_interval = self.stream_interval
        deadline = clock.now() + time_remaining if time_remaining is not None else None
        max_retries = request.max_retries if request.HasField("max_retries") else self.max_retries
        bound = log.bind(request_id=request.request_id)
        route = self._route(request)
        counters = self.counters
        counters.requests_total += 1
        counters.in_flight += 1
        backoff = Backoff(config.RETRY_BACKOFF_BASE_S, config.RETRY_BACKOFF_CAP_S)
        delivered = _client_resume_point(request)
        # Tokens the client brought (it received them through another coordinator).
        brought = len(delivered.token_ids)
        tried: list[str] = []
        errors: list[str] = []
        ok = False
        metrics = self.metrics
        started = clock.now()
        first_token = False
        status = "CANCELLED"  # unless it ends otherwise: the client went away
        cancelled = True
        error = ""  # why it failed, for the log
        # The prompt's prefix blocks, cut only if the strategy asks (cache_aware does).
        prefix = RequestPrefix(request)
        try:
            for attempt in range(1, max_retries + 2):
                node = await self._wait_for_node(request, route, tried, deadline, prefix)
                tried.append(node.node_id)
                # Closed here, not when collected: a client that goes away stops the attempt now.
                relay = contextlib.aclosing(
                    self._relay(node, request, attempt, deadline, delivered)
                )
                try:
                    async with relay as responses:
                        async for response in responses:
                            if not first_token and response.token_ids:
                                first_token = True
                                metrics.time_to_first_token.observe(clock.now() - started)
                            if response.HasField("usage"):
                                self.balancer.observe(node, prefix, response.usage.prompt_tokens)
                            yield response
                    ok, status = True, "OK"
                    return
                except AttemptError as exc:
                    errors.append(f"[{attempt}] {exc}")
                    if exc.kind is Failure.REQUEST:
                        raise DispatchError(exc.code, exc.details) from None
                    if attempt > max_retries:
                        break
                    if _expired(deadline):
                        # No time left for another attempt: say why the last ones failed.
                        raise DispatchError(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"deadline exceeded after {len(tried)} attempt(s): "
                            + "; ".join(errors),
                        ) from None
                    counters.retries_total += 1
                    metrics.retries.inc()
                    if exc.kind is Failure.NODE:
                        metrics.failovers.inc()
                    delay = backoff.next_delay()
                    bound.info(
                        "attempt failed, failing over",
                        node_id=exc.node_id,
                        attempt=attempt,
                        code=exc.code.name,
                        error=exc.details,
                        reason=f"node {'busy' if exc.kind is Failure.BUSY else 'failure'}: "
                        f"{exc.code.name} {exc.details}".strip(),
                        resume_after_tokens=len(delivered.token_ids),
                        retry_in_s=round(delay, 3),
                    )
                    await _sleep_within(delay, deadline)
            raise DispatchError(
                grpc.StatusCode.UNAVAILABLE,
                f"request {request.request_id} failed after {len(tried)} attempt(s): "
                + "; ".join(errors),
            )
        except DispatchError as exc:
            status, error = exc.code.name, exc.message
            cancelled = exc.caller_deadline
            raise
        finally:
            counters.in_flight -= 1
            if ok:
                counters.requests_succeeded += 1
            elif cancelled:
                counters.requests_cancelled += 1
            else:
                counters.requests_failed += 1
            duration = clock.now() - started
            metrics.requests.labels(status).inc()
            metrics.request_duration.observe(duration)
            metrics.generated_tokens.inc(len(delivered.token_ids) - brought)
            extra: dict[str, object] = {"prompt": request.prompt} if self.log_prompts else {}
            if error:
                extra["error"] = error
            if brought:
                extra["resumed_from_client_tokens"] = brought
            bound.info(
                "request finished",
                node_id=tried[-1] if tried else "",
                status=status,
                attempts=len(tried),
                completion_tokens=len(delivered.token_ids),
                duration_s=round(duration, 4),
                **extra,
            )

    def _route(self, request: generate_pb2.GenerateRequest) -> Route:
        """The model and modalities to pick nodes by, or DispatchError: a model no node
        serves is NOT_FOUND, no model in a cluster serving several is INVALID_ARGUMENT, and so
        is media no node serving the model takes (or produces): refused, never dropped."""
        route = Route(request.model, input_modalities(request), output_modalities(request))
        registry = self.registry
        if not registry.models:
            return route  # no node has joined yet: wait for one, as for a healthy one
        served = ", ".join(registry.models)
        if request.model:
            if request.model not in registry.model_names:
                raise DispatchError(
                    grpc.StatusCode.NOT_FOUND,
                    f"model {request.model!r} is not served here; served: {served}",
                )
        elif len(registry.models) > 1:
            raise DispatchError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"this cluster serves several models ({served}): name one in GenerateRequest.model",
            )
        if route.inputs or route.outputs:
            self._check_capable(route, request.model or registry.models[0])
        return route

    def _check_capable(self, route: Route, name: str) -> None:
        """INVALID_ARGUMENT unless some node serving the route's model (healthy now or not)
        takes its input modalities and produces its output modalities."""
        nodes = self.registry.serving(route.model)
        if any(n.takes(route.inputs, route.outputs) for n in nodes):
            return
        takes = {m for n in nodes for m in n.info.input_modalities}
        produces = {m for n in nodes for m in n.info.output_modalities}
        problem = modality_problem(route.inputs, route.outputs, takes, produces, name)
        if problem is not None:
            raise DispatchError(grpc.StatusCode.INVALID_ARGUMENT, str(problem))
        # Each modality has a node, but no node has them all.
        raise DispatchError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"no node of model {name!r} takes {', '.join(sorted(route.inputs)) or 'text'} "
            f"input and produces {', '.join(sorted({'text', *route.outputs}))} output together",
        )

    async def _wait_for_node(
        self,
        request: generate_pb2.GenerateRequest,
        route: Route,
        tried: list[str],
        deadline: float | None,
        prefix: RequestPrefix,
    ) -> Node:
        """A node for the next attempt (serving the route's model and modalities), waiting
        with backoff while there is none."""
        give_up = clock.now() + self.no_node_wait_s
        if deadline is not None:
            # Answer a little before the caller's deadline so the reason reaches it.
            give_up = min(give_up, deadline - min(0.05, 0.1 * (deadline - clock.now())))
        backoff = Backoff(config.NO_NODE_BACKOFF_BASE_S, config.NO_NODE_BACKOFF_CAP_S)
        while True:
            node = self.balancer.pick(
                request.affinity_key, tried, route.model, route.inputs, route.outputs, prefix
            )
            if node is not None:
                return node
            left = give_up - clock.now()
            if left <= 0:
                raise DispatchError(grpc.StatusCode.UNAVAILABLE, "no healthy nodes available")
            await self.registry.wait_available(min(backoff.next_delay(), left))

    async def _relay(
        self,
        node: Node,
        request: generate_pb2.GenerateRequest,
        attempt: int,
        deadline: float | None,
        delivered: Delivered,
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        """One attempt: stream the node's responses; AttemptError if the node fails.

        When an earlier attempt already delivered output, the node is asked to resume after
        it, so the client receives each token exactly once. Media output pieces are held until
        their item's last piece arrives, then relayed together: a failover discards a partial
        item (never relayed) and the next node produces it again, so each item reaches the
        client exactly once, whole.
        """
        timeout = None if deadline is None else max(0.0, deadline - clock.now())
        first = node_agent_pb2.AgentRequest(generate=request, attempt=attempt)
        if delivered.token_ids or delivered.media_items:
            first.resume.token_ids.extend(delivered.token_ids)
            first.resume.text = "".join(delivered.text)
            first.resume.media_items_delivered = delivered.media_items
            self.counters.resumes_total += 1
            self.metrics.resumes.inc()
        node.in_flight += 1
        node.dispatched += 1
        stream = node.client.generate(first, timeout)
        lost: list[str] = []
        stalled: list[str] = []

        def on_lost(reason: str) -> None:
            # The health monitor found the node unreachable (e.g. frozen): stop waiting on it.
            lost.append(reason)
            stream.cancel()

        def on_stall(reason: str) -> None:
            stalled.append(reason)
            stream.cancel()

        node.lost_hooks.add(on_lost)
        watched = self.stalls.watch(
            node, _prompt_tokens(request) + len(delivered.token_ids), on_stall
        )
        finished = False
        # When the first tokens arrived, and the tokens delivered then: the decode's start.
        decode_from: tuple[float, int] | None = None
        # The pieces of the media item in progress, not relayed until it completes.
        held: list[generate_pb2.Media] = []
        held_bytes = 0
        try:
            async for response in stream:
                watched.stamp(clock.now())
                aborted = response.finish_reason == "abort"
                if aborted:
                    # The coordinator did not ask for it (it stops reading when it cancels):
                    # the node or its engine dropped the request. Keep what it produced, then
                    # fail over and resume; the client never sees a truncated "success".
                    response.finish_reason = ""
                    response.ClearField("usage")
                complete: list[generate_pb2.Media] = []
                if response.outputs:
                    for piece in response.outputs:
                        held.append(piece)
                        held_bytes += len(piece.data)
                        if piece.last_chunk:
                            complete.extend(held)
                            held, held_bytes = [], 0
                            delivered.media_items += 1
                    response.ClearField("outputs")
                    if held_bytes > self.max_held_media_bytes:
                        raise DispatchError(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"media output item {held[0].index} of request {request.request_id} "
                            f"exceeds max_held_media_bytes={self.max_held_media_bytes} "
                            "(the bytes held until an item completes); the request was aborted",
                        )
                if held and response.finish_reason:
                    raise NodeCallError(
                        grpc.StatusCode.INTERNAL,
                        f"the node finished with media item {held[0].index} incomplete",
                    )
                if not aborted or response.token_ids or response.text or complete:
                    if response.token_ids and decode_from is None:
                        decode_from = (
                            clock.now(),
                            len(delivered.token_ids) + len(response.token_ids),
                        )
                    delivered.token_ids.extend(response.token_ids)
                    delivered.text.append(response.text)
                    finished = bool(response.finish_reason)
                    if response.token_ids or response.text or complete or finished:
                        # While the client takes its time, the node's silence is not the
                        # node's: the stall clock stops (a client that never reads is
                        # OutputOverflow's business).
                        watched.client_reading = True
                        for message in _with_media(response, complete):
                            yield message
                        watched.resume(clock.now())
                if aborted:
                    raise NodeCallError(
                        grpc.StatusCode.ABORTED,
                        "the node aborted the request without being asked (finish_reason abort)",
                    )
                if finished:
                    # The client has the whole output: whatever the node does next (its status,
                    # or dying before sending it) must not be failed over and resumed.
                    break
            if not finished:
                raise AttemptError(
                    node.node_id,
                    grpc.StatusCode.UNAVAILABLE,
                    "stream ended without a finish_reason",
                )
            self.registry.record_success(node)
            learn(node, watched)
            if self.outliers is not None and decode_from is not None:
                # The node's pace is its decode: time per token after the first ones. The
                # time to them is the prefill of whatever of the prompt was not cached, which
                # prefix caching (and cache_aware, by design) makes differ from node to node:
                # the node computing the cold prompts is not a slow node. A node silent before
                # its first token is the stall watch's business.
                now = clock.now()
                began, tokens_then = decode_from
                later = len(delivered.token_ids) - tokens_then
                if later > 0:
                    self.outliers.record(node.node_id, (now - began) / later, now)
        except OutputOverflow as exc:
            # The client's doing, not the node's: the request ends here.
            raise DispatchError(exc.code, exc.details) from None
        except NodeCallError as exc:
            if lost:
                error = AttemptError(
                    node.node_id, grpc.StatusCode.UNAVAILABLE, f"node lost: {lost[0]}"
                )
                self.registry.record_failure(node, str(error), unreachable=True)
                raise error from None
            if stalled:
                error = AttemptError(node.node_id, grpc.StatusCode.UNAVAILABLE, stalled[0])
                self.registry.record_failure(node, str(error), unreachable=False)
                raise error from None
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(deadline):
                # The caller's own deadline: nothing to retry. It counts against the node only
                # if the node had been silent for longer than it usually is (a stuck node
                # never reaching the stall bound within short caller deadlines).
                silent = watched.silent_for(clock.now())
                if silent >= self.stalls.policy.expected_silence(watched):
                    self.registry.record_failure(
                        node,
                        f"{node.node_id}: the caller's deadline expired after {silent:.1f}s "
                        "without output from the node",
                        unreachable=False,
                    )
                raise DispatchError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", caller_deadline=True
                ) from None
            error = AttemptError(node.node_id, exc.code, exc.details)
            if error.kind is Failure.NODE:
                self.registry.record_failure(
                    node, str(error), unreachable=exc.code == grpc.StatusCode.UNAVAILABLE
                )
            raise error from None
        finally:
            self.stalls.unwatch(watched)
            node.lost_hooks.discard(on_lost)
            node.in_flight -= 1
            if not finished:
                # Client cancelled, deadline, or failure: make sure the agent stops too.
                stream.cancel()

    def _judge_outliers(self, now: float) -> None:
        """Eject the healthy nodes far slower than their peers (every OUTLIER_INTERVAL_S).

        Nodes are compared with the nodes serving the same model only (another model may well
        be slower per token), and at least half of each model's nodes stay in (Envoy's max
        ejection percent, across rounds)."""
        if self.outliers is None or now < self._next_outlier_check:
            return
        self._next_outlier_check = now + config.OUTLIER_INTERVAL_S
        by_model: dict[str, list[Node]] = {}
        for node in self.registry.nodes.values():
            by_model.setdefault(node.info.model, []).append(node)
        for nodes in by_model.values():
            self._judge_peers(nodes, now)

    def _judge_peers(self, nodes: list[Node], now: float) -> None:
        assert self.outliers is not None
        healthy = [n for n in nodes if n.verdict == HEALTHY]
        room = len(healthy) - (len(nodes) + 1) // 2
        if room <= 0:
            return
        by_id = {n.node_id: n for n in healthy}
        typical = {node_id: self.outliers.typical(node_id, now) for node_id in by_id}
        for node_id in self.outliers.outliers(list(by_id), now)[:room]:
            peers = sorted(t for other, t in typical.items() if other != node_id and t is not None)
            self.registry.eject(
                by_id[node_id],
                LATENCY_OUTLIER,
                f"{(typical[node_id] or 0) * 1000:.1f} ms per output token, its peers' median "
                f"{_median(peers) * 1000:.1f} ms",
            )


def _client_resume_point(request: generate_pb2.GenerateRequest) -> Delivered:
    """What the client says it already received (GenerateRequest.resume: its coordinator went
    away mid-stream), taken out of the request: the first attempt resumes from it exactly as
    a failover would, and the nodes get it as AgentRequest.resume."""
    if not request.HasField("resume"):
        return Delivered()
    resume = request.resume
    delivered = Delivered(
        token_ids=list(resume.token_ids),
        text=[resume.text] if resume.text else [],
        media_items=resume.media_items_delivered,
    )
    request.ClearField("resume")
    return delivered


def _with_media(
    response: generate_pb2.GenerateResponse, pieces: list[generate_pb2.Media]
) -> list[generate_pb2.GenerateResponse]:
    """``response`` with the pieces of the media items that completed: one message, or several
    of at most about MEDIA_RELAY_MESSAGE_BYTES of media each (the first with the text, the
    last with the finish), so a large item fits every channel's message limit."""
    groups: list[list[generate_pb2.Media]] = [[]]
    size = 0
    for piece in pieces:
        if groups[-1] and size + len(piece.data) > config.MEDIA_RELAY_MESSAGE_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += len(piece.data)
    if len(groups) == 1:
        response.outputs.extend(groups[0])
        return [response]
    messages = [
        generate_pb2.GenerateResponse(
            request_id=response.request_id,
            node_id=response.node_id,
            attempt=response.attempt,
            outputs=group,
        )
        for group in groups
    ]
    messages[0].text = response.text
    messages[0].token_ids.extend(response.token_ids)
    if response.finish_reason:
        messages[-1].finish_reason = response.finish_reason
        messages[-1].usage.CopyFrom(response.usage)
    return messages


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _prompt_tokens(request: generate_pb2.GenerateRequest) -> int:
    """The prompt's length in tokens (estimated at 4 UTF-8 bytes a token for text)."""
    return (
        len(request.prompt_token_ids)
        or (len(request.prompt) + chat_text_bytes(request.messages)) // 4
    )


def _expired(deadline: float | None) -> bool:
    return deadline is not None and clock.now() >= deadline - 0.01


async def _sleep_within(delay: float, deadline: float | None) -> None:
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - clock.now()))
    await asyncio.sleep(delay)
