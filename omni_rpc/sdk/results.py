"""What the SDK hands back: results, streamed deltas and the error of a failed request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

Prompt = str | Sequence[int]


class GenerationError(RuntimeError):
    """A request that could not be served; ``code`` is the gRPC status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, request_id: str = "", index: int | None = None
    ) -> None:
        where = f"prompt #{index}: " if index is not None else ""
        super().__init__(f"{where}{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.index = index


class CoordinatorUnreachableError(GenerationError, ConnectionError):
    """No connection to a coordinator this orchestrator has never reached, within its
    ``connect_timeout`` (``code`` is UNAVAILABLE; also a ``ConnectionError``)."""

    def __init__(self, address: str, waited_s: float) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"coordinator at {address} is unreachable: no connection within {waited_s:g} s "
            "(connect_timeout)",
        )
        self.address = address
        self.waited_s = waited_s


@dataclass
class GenerationDelta:
    """One streamed message: new text and token ids since the previous delta."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    node_id: str
    attempt: int
    request_id: str
    # Set on the last delta: token counts of the whole generation.
    usage: dict[str, int] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    node_id: str
    # Nodes that worked on the request, in order (more than one after a failover).
    attempts: int
    usage: dict[str, int]
    request_id: str = ""
    nodes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text
