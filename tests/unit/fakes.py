"""In-process fakes of the coordinator's network peers (``coordinator.node_client``).

``FakeNode`` plays one node agent: a deterministic token stream per prompt (so a resumed
stream can be checked token for token against an undisturbed one), a health status, a load
report, and faults a test switches on: killed (calls break with UNAVAILABLE), frozen (nothing
answers; checks run into their deadline), busy, failing requests, or a failure after N tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from coordinator.node_client import SERVING, NodeCallError
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_pb2, registry_pb2

DEFAULT_MAX_TOKENS = 16
# The fake tokenizer: a prompt's tokens are its UTF-8 bytes over this.
FAKE_BYTES_PER_TOKEN = 8


def token_at(prompt: str, position: int) -> int:
    """The fake engine's greedy output: a function of the prompt and the position only."""
    digest = hashlib.blake2b(f"{prompt}\0{position}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 50_000


def expected_tokens(prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[int]:
    return [token_at(prompt, p) for p in range(max_tokens)]


def text_of(token: int) -> str:
    return f"<{token}>"


@dataclass
class Fault:
    """What the next attempt on a node does instead of completing."""

    after_tokens: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    details: str = "injected"
    # Stop answering after ``after_tokens`` (a frozen process) instead of failing.
    hang: bool = False
    # End the stream after ``after_tokens`` without a finish_reason and without an error.
    end: bool = False


def join_request(node_id: str, capacity: int = 4) -> registry_pb2.JoinRequest:
    return registry_pb2.JoinRequest(
        node_id=node_id, address=f"{node_id}.test:1", engine="fake", capacity=capacity
    )


class FakeAttempt:
    def __init__(
        self, node: FakeNode, first: node_agent_pb2.AgentRequest, timeout_s: float | None
    ) -> None:
        self.node = node
        self.first = first
        # Like a gRPC deadline: the call fails with DEADLINE_EXCEEDED when it passes.
        loop = asyncio.get_running_loop()
        self.deadline = None if timeout_s is None else loop.time() + timeout_s
        self.fault = node.faults.popleft() if node.faults else None
        self._stop = asyncio.Event()
        self._error: NodeCallError | None = None
        self.cancelled = False

    async def _pause(self, seconds: float | None) -> None:
        """Let ``seconds`` pass (None: forever) unless the attempt is stopped or its deadline
        passes first."""
        limit, expires = seconds, False
        if self.deadline is not None:
            left = self.deadline - asyncio.get_running_loop().time()
            if limit is None or left <= limit:
                limit, expires = max(0.0, left), True
        try:
            await asyncio.wait_for(self._stop.wait(), limit)
        except TimeoutError:
            if expires:
                raise NodeCallError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
                ) from None
            return
        raise self._error or NodeCallError(grpc.StatusCode.CANCELLED, "attempt cancelled")

    def fail(self, error: NodeCallError) -> None:
        self._error = error
        self._stop.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._stop.set()

    async def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        node = self.node
        request = self.first.generate
        node.active.add(self)
        try:
            if not node.reachable:
                raise NodeCallError(grpc.StatusCode.UNAVAILABLE, "connection refused")
            await self._pause(0.0)  # a deadline already passed fails the call at once
            if node.frozen:
                await self._pause(None)
            if node.busy:
                raise NodeCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "node full")
            wanted = (
                request.sampling.max_tokens
                if request.sampling.HasField("max_tokens")
                else DEFAULT_MAX_TOKENS
            )
            start = len(self.first.resume.token_ids)
            await self._pause(node.ttft_s)
            for position in range(start, wanted):
                if self.fault is not None and position - start >= self.fault.after_tokens:
                    if self.fault.hang:
                        await self._pause(None)
                    if self.fault.end:
                        return
                    raise NodeCallError(self.fault.code, self.fault.details)
                token = token_at(request.prompt, position)
                response = generate_pb2.GenerateResponse(
                    request_id=request.request_id,
                    text=text_of(token),
                    token_ids=[token],
                    node_id=node.node_id,
                    attempt=self.first.attempt,
                )
                if position == wanted - 1:
                    response.finish_reason = "length"
                    response.usage.completion_tokens = wanted
                    response.usage.prompt_tokens = (
                        len(request.prompt.encode()) // FAKE_BYTES_PER_TOKEN
                    )
                yield response
                node.tokens_sent += 1
                if position < wanted - 1:
                    await self._pause(node.itl_s)
        finally:
            node.active.discard(self)


class FakeNode:
    """One fake node agent; also its own connector's product (``FakeFleet.connect``)."""

    def __init__(self, node_id: str, *, ttft_s: float = 0.01, itl_s: float = 0.01) -> None:
        self.node_id = node_id
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.status = SERVING
        self.reachable = True
        self.frozen = False
        self.busy = False
        self.draining = False
        self.faults: deque[Fault] = deque()
        self.attempts: list[node_agent_pb2.AgentRequest] = []
        self.streams: list[FakeAttempt] = []
        self.active: set[FakeAttempt] = set()
        self.tokens_sent = 0
        self.checks = 0
        # Where the registry wants load reports delivered (report_load).
        self.load_listener: Callable[[node_pb2.NodeLoad], None] | None = None
        self.closed = False
        self._watchers: set[asyncio.Queue[str | NodeCallError]] = set()

    # -- what a test does to the node -------------------------------------------------------

    def set_status(self, status: str) -> None:
        self.status = status
        for queue in self._watchers:
            queue.put_nowait(status)

    def kill(self) -> None:
        """The process dies: open calls and watch streams break, new calls are refused."""
        self.reachable = False
        error = NodeCallError(grpc.StatusCode.UNAVAILABLE, "connection reset")
        for attempt in list(self.active):
            attempt.fail(error)
        for queue in self._watchers:
            queue.put_nowait(error)

    def revive(self) -> None:
        self.reachable = True
        self.frozen = False

    def freeze(self) -> None:
        """The process stops answering but keeps its connections open."""
        self.frozen = True

    def fail_next(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    # -- NodeClient --------------------------------------------------------------------------

    def generate(self, first: node_agent_pb2.AgentRequest, timeout_s: float | None) -> FakeAttempt:
        self.attempts.append(first)
        attempt = FakeAttempt(self, first, timeout_s)
        self.streams.append(attempt)
        return attempt

    async def watch(self) -> AsyncGenerator[str, None]:
        if not self.reachable:
            raise NodeCallError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        queue: asyncio.Queue[str | NodeCallError] = asyncio.Queue()
        queue.put_nowait(self.status)
        self._watchers.add(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, NodeCallError):
                    raise item
                yield item
        finally:
            self._watchers.discard(queue)

    async def _answer(self, timeout_s: float) -> None:
        self.checks += 1
        if not self.reachable:
            raise NodeCallError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        if self.frozen:
            await asyncio.sleep(timeout_s)
            raise NodeCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    async def check(self, timeout_s: float) -> str:
        await self._answer(timeout_s)
        return self.status

    async def load(self, timeout_s: float) -> node_pb2.NodeLoad:
        await self._answer(timeout_s)
        return node_pb2.NodeLoad(
            node_id=self.node_id,
            running=len(self.active),
            capacity=4,
            engine_healthy=self.status == SERVING,
            draining=self.draining,
        )

    def report_load(self, listener: Callable[[node_pb2.NodeLoad], None]) -> None:
        self.load_listener = listener

    async def close(self) -> None:
        self.closed = True
        self.kill()


class FakeFleet:
    """A connector over a set of fake nodes, by node id."""

    def __init__(self, *nodes: FakeNode) -> None:
        self.nodes = {n.node_id: n for n in nodes}

    def add(self, node: FakeNode) -> FakeNode:
        self.nodes[node.node_id] = node
        return node

    def __call__(self, request: registry_pb2.JoinRequest) -> FakeNode:
        return self.nodes.setdefault(request.node_id, FakeNode(request.node_id))
