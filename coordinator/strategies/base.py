"""The load-balancing strategy interface: pick one node out of the candidates.

Strategies are pure: they see a snapshot of each candidate and keep only their own cursor,
so the coordinator's balancer and the SDK's ``LoadBalancer`` run the very same code.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Protocol

from coordinator.prefix import RequestPrefix


class Candidate(Protocol):
    """What a strategy may look at on a node."""

    @property
    def node_id(self) -> str: ...

    @property
    def in_flight(self) -> int:
        """Requests the coordinator has on the node now."""
        ...

    @property
    def others_in_flight(self) -> int:
        """Requests others (other coordinators, other worker processes) have on the node, as
        its last load report showed them."""
        ...

    @property
    def capacity(self) -> int:
        """Concurrency limit of the node's engine (0: unknown)."""
        ...

    @property
    def kv_cache_usage(self) -> float:
        """Share of the engine's KV cache in use, as the agent last reported it (0..1)."""
        ...

    @property
    def cache_block_tokens(self) -> int:
        """Block size of the engine's prefix cache, in tokens (0: unknown)."""
        ...

    @property
    def cache_capacity_tokens(self) -> int:
        """Size of the engine's prefix cache, in tokens (0: unknown)."""
        ...


def load(c: Candidate) -> int:
    """Requests on the node: this process's and, as last reported, everyone else's."""
    return c.in_flight + c.others_in_flight


class Strategy(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        """Choose one of ``candidates`` (never empty) for a request with affinity ``key``
        (GenerateRequest.affinity_key) and prompt ``prefix`` (None: not known, as in a plan).

        ``candidates`` come in node id order (the registry keeps its dispatchable set so), so a
        strategy's rotation is stable as nodes come and go without sorting on every request.
        """

    def forget(self, node_id: str) -> None:  # noqa: B027  # most strategies keep nothing
        """The node left (or was replaced by a new process): drop what is kept about it."""

    def observe(  # noqa: B027  # most strategies learn nothing from answers
        self, node_id: str, prefix: RequestPrefix, prompt_tokens: int
    ) -> None:
        """The node answered a request with prompt ``prefix``: its usage counted
        ``prompt_tokens`` prompt tokens."""
