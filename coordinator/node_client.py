"""What the coordinator asks of one node, as an interface: the network stays at the edge.

The registry, the health monitor, the breaker, the dispatcher and admission work on this
interface only, so they are tested in process against fakes (tests/unit); the gRPC adapter in
``coordinator.node_client_grpc`` is the one implementation that touches the network.

Errors cross the interface as ``NodeCallError`` with a gRPC status code (the vocabulary the
failure classification is written in), never as a transport's own exception type.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Protocol

import grpc

from omni_rpc import config
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_pb2, registry_pb2

# Health statuses as grpc.health.v1 names them ("SERVING", "NOT_SERVING", ...).
SERVING = "SERVING"
# How an agent's FAILED_PRECONDITION details begin when a call was meant for another node id or
# incarnation than the process that answers it.
IDENTITY_MISMATCH = config.IDENTITY_MISMATCH_PREFIX


class NodeCallError(Exception):
    """A call to a node ended with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(f"{code.name} {details}".strip())
        self.code = code
        self.details = details


class OutputOverflow(NodeCallError):
    """The client stopped reading and the request's buffered output reached the limit.

    A verdict on the request, not the node: it ends the call (RESOURCE_EXHAUSTED), never fails
    over.
    """

    def __init__(self, buffered: int, limit: int) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the client is not reading its stream: {buffered} tokens of output are buffered, "
            f"over the limit max_buffered_tokens={limit}; the request was aborted",
        )


class AttemptStream(Protocol):
    """One Generate attempt on one node: the responses, and a way to stop it.

    Iterating yields the node's responses and raises ``NodeCallError`` when the call fails
    (including after ``cancel()``); the caller's own cancellation propagates unchanged.
    """

    def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]: ...

    def cancel(self) -> None:
        """Stop the attempt now (safe at any time, from any callback, more than once)."""


class NodeClient(Protocol):
    """The calls the coordinator makes to one node agent."""

    def generate(
        self, first: node_agent_pb2.AgentRequest, timeout_s: float | None
    ) -> AttemptStream:
        """Start an attempt: ``first`` carries the request (and where to resume)."""
        ...

    def watch(self) -> AsyncGenerator[str, None]:
        """The node's health status, at once and on every change, until the stream breaks
        (``NodeCallError``) or ends."""
        ...

    async def check(self, timeout_s: float) -> str:
        """The node's health status now; ``NodeCallError`` (DEADLINE_EXCEEDED for a node that
        does not answer in time)."""
        ...

    async def load(self, timeout_s: float) -> node_pb2.NodeLoad:
        """The node's own load report."""
        ...

    def report_load(self, listener: Callable[[node_pb2.NodeLoad], None]) -> None:
        """Call ``listener`` with every load report the node sends unasked (on its session,
        kept open for it from now on)."""
        ...

    async def close(self) -> None:
        """Release the connection; calls still open on it fail."""
        ...


# How the registry reaches a node that joined: the gRPC connector in production, fakes in tests.
Connector = Callable[[registry_pb2.JoinRequest], NodeClient]
