"""Least loaded: the node with the lowest share of its capacity in use.

Load is the coordinator's own in-flight count (exact and current, unlike a polled report),
relative to the node's capacity so a bigger node takes more. Between equally busy nodes the
one whose engine reported less KV cache in use wins (long prompts weigh more than short ones);
remaining ties rotate, so an idle cluster is filled evenly rather than from the first node.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.strategies.base import Candidate, Strategy


def utilization(c: Candidate) -> float:
    return c.in_flight / max(1, c.capacity)


class LeastLoaded(Strategy):
    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Candidate], key: str = "") -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.node_id)
        n = len(ordered)
        start = self._turn % n
        self._turn += 1
        rotated = ordered[start:] + ordered[:start]
        return min(rotated, key=lambda c: (utilization(c), c.kv_cache_usage))
