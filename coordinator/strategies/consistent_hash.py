"""Consistent hashing on ``affinity_key``, with bounded loads: session affinity.

Every node owns ``VIRTUAL_NODES`` points on a 64-bit ring (hashes of its node id); a key goes
to the owner of the first point at or after the key's hash. A node that joins takes over only
the keys between its points and their predecessors; one that leaves hands over only its own
keys, each to the next point's node. So a session (all requests with one key) stays on its
node, and moves only when that node leaves or is over its load bound.

The bound (Mirrokni, Thorup and Zadimoghaddam's consistent hashing with bounded loads): no
node takes a request while it has more than ``LOAD_FACTOR`` times the average load (this
process's requests plus the others' last reported ones); the walk goes on to the next node on
the ring. Requests without a key have no affinity: they go to the least loaded node.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

from coordinator.prefix import RequestPrefix
from coordinator.strategies.base import Candidate, Strategy, load
from coordinator.strategies.least_loaded import LeastLoaded

VIRTUAL_NODES = 100
LOAD_FACTOR = 1.25
# Rings kept for the candidate sets seen lately (model filters and failovers make a few).
MAX_RINGS = 16


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Ring:
    """The ring of one set of node ids."""

    def __init__(self, node_ids: Sequence[str]) -> None:
        points = sorted(
            (_point(f"{node_id}#{v}"), node_id)
            for node_id in node_ids
            for v in range(VIRTUAL_NODES)
        )
        self.points = [p for p, _ in points]
        self.owners = [o for _, o in points]

    def walk(self, key: str) -> list[str]:
        """Node ids in ring order from the key's point, each once."""
        start = bisect.bisect_left(self.points, _point(key))
        seen: dict[str, None] = {}
        size = len(self.owners)
        for i in range(size):
            seen.setdefault(self.owners[(start + i) % size], None)
        return list(seen)


class ConsistentHash(Strategy):
    name = "consistent_hash"

    def __init__(self, load_factor: float = LOAD_FACTOR) -> None:
        self.load_factor = load_factor
        self._rings: dict[tuple[str, ...], Ring] = {}
        self._no_key = LeastLoaded()

    def ring(self, candidates: Sequence[Candidate]) -> Ring:
        ids = tuple(c.node_id for c in candidates)
        ring = self._rings.get(ids)
        if ring is None:
            if len(self._rings) >= MAX_RINGS:
                self._rings.pop(next(iter(self._rings)))
            ring = self._rings[ids] = Ring(ids)
        return ring

    def bound(self, candidates: Sequence[Candidate]) -> int:
        """The most requests a node may hold and still take one more."""
        total = sum(load(c) for c in candidates) + 1
        return math.ceil(self.load_factor * total / len(candidates))

    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        if not key:
            return self._no_key.pick(candidates)
        by_id = {c.node_id: c for c in candidates}
        bound = self.bound(candidates)
        order = self.ring(candidates).walk(key)
        for node_id in order:
            if load(by_id[node_id]) + 1 <= bound:
                return by_id[node_id]
        return by_id[order[0]]  # cannot happen: some node is at or below the average

    def forget(self, node_id: str) -> None:
        self._rings = {ids: r for ids, r in self._rings.items() if node_id not in ids}
