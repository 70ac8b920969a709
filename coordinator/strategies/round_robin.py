"""Round robin, the default strategy: each healthy node in turn."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.strategies.base import Candidate, Strategy


class RoundRobin(Strategy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate], key: str = "") -> Candidate:
        # Order by id so the rotation is stable while the healthy set changes.
        ordered = sorted(candidates, key=lambda c: c.node_id)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return chosen
