"""Least loaded: the node with the lowest share of its capacity in use.

Load is the coordinator's own in-flight count (exact and current, unlike a polled report) plus
what others (other coordinators, other worker processes) had on the node at its last load
report (the agents report on every session within LOAD_REPORT_INTERVAL_S of a change), relative
to the node's capacity so a bigger node takes more. Between equally busy nodes the
one whose engine reported less KV cache in use wins (long prompts weigh more than short ones);
remaining ties rotate, so an idle cluster is filled evenly rather than from the first node.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.prefix import RequestPrefix
from coordinator.strategies.base import Candidate, Strategy, load


def utilization(c: Candidate) -> float:
    return load(c) / max(1, c.capacity)


class LeastLoaded(Strategy):
    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0

    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        n = len(candidates)
        start = self._turn % n
        self._turn += 1
        # The first of the least loaded, counting from this turn's start: ties rotate.
        best = candidates[start]
        best_load = (utilization(best), best.kv_cache_usage)
        for offset in range(1, n):
            candidate = candidates[(start + offset) % n]
            load = (utilization(candidate), candidate.kv_cache_usage)
            if load < best_load:
                best, best_load = candidate, load
        return best
