"""Round robin, the default strategy: each healthy node in turn."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.prefix import RequestPrefix
from coordinator.strategies.base import Candidate, Strategy


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen
