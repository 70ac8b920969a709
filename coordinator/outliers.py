"""Latency outlier detection: eject a node that answers health checks but is far slower than
its peers, as Envoy's outlier detection does for success rate.

Dispatch records each finished attempt's decode pace: the time per output token after the
first ones (the time to them is the prefill of the uncached part of the prompt, which prefix
caching makes differ from node to node by design; a node that never starts is the stall watch's
business); every few seconds the health loop asks which of the healthy nodes to eject. A
node's typical latency is the median of its samples in the last ``window_s`` seconds; it is
*judged* once it has ``min_samples`` of them. A judged node is an outlier when its typical
latency exceeds both ``factor`` times and ``min_floor_s`` more than the median of the
typical latencies of the *other* judged candidates (leaving itself out, so a slow node never
drags its own yardstick up).

Decisions:

* Comparison needs at least one judged peer: a lone judged node is never an outlier. With two
  judged nodes the yardstick is simply the other one, so the slower is ejected only when it is
  more than ``factor`` times (and ``min_floor_s`` more than) the faster one; the fraction cap
  keeps the faster one in.
* At most ``floor(max_ejected_fraction * judged)`` nodes are ejected per call, and never all
  judged ones (at most ``judged - 1``), worst (highest ratio to its yardstick) first. The cap
  is per call over the candidates given: nodes ejected earlier are not candidates any more, so
  a global cap across rounds, if wanted, belongs to the caller.
* Once reported, a node's samples are dropped: after re-admission it is judged afresh.

Memory is bounded: at most ``max_samples`` samples per node, older ones (and ones past the
window) dropped. ``record`` is O(1) amortized, with no sorting; ``outliers`` sorts each
candidate's few samples. Times are monotonic seconds passed in by the caller
(``coordinator.clock.now()``), so this is pure logic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from omni_rpc import config

# The verdict an ejection by this detector is reported under.
LATENCY_OUTLIER = "latency outlier"


@dataclass(frozen=True)
class OutlierPolicy:
    # An outlier's typical latency is more than factor x its judged peers' median...
    factor: float = config.OUTLIER_LATENCY_FACTOR
    # ... and more than this above it (seconds per token), so microsecond noise never ejects.
    min_floor_s: float = config.OUTLIER_MIN_FLOOR_S
    # Samples a node needs within the window before it is judged.
    min_samples: int = config.OUTLIER_MIN_SAMPLES
    # Samples older than this (seconds) are dropped.
    window_s: float = config.OUTLIER_WINDOW_S
    # Never eject more than this share of the judged nodes in one call (and never all of them).
    max_ejected_fraction: float = config.OUTLIER_MAX_EJECTED_FRACTION
    # Samples kept per node at most (newest), bounding memory on busy nodes.
    max_samples: int = config.OUTLIER_MAX_SAMPLES

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"factor must be >= 1, got {self.factor}")
        if not self.min_floor_s >= 0.0:
            raise ValueError(f"min_floor_s must be >= 0, got {self.min_floor_s}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if not self.window_s > 0.0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")
        if not 0.0 <= self.max_ejected_fraction <= 1.0:
            raise ValueError(
                f"max_ejected_fraction must be within [0, 1], got {self.max_ejected_fraction}"
            )
        if self.max_samples < self.min_samples:
            raise ValueError(
                f"max_samples ({self.max_samples}) must be >= min_samples ({self.min_samples})"
            )


def _median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    if n % 2:
        return sorted_values[mid]
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


def _median_without(sorted_values: Sequence[float], i: int) -> float:
    """Median of ``sorted_values`` with index ``i`` left out (at least two values)."""

    def at(j: int) -> float:
        return sorted_values[j if j < i else j + 1]

    m = len(sorted_values) - 1
    mid = m // 2
    if m % 2:
        return at(mid)
    return (at(mid - 1) + at(mid)) / 2.0


class LatencyOutliers:
    """Per-node recent latencies, and which nodes are far slower than their peers."""

    def __init__(self, policy: OutlierPolicy = OutlierPolicy()) -> None:
        self.policy = policy
        # node id -> (monotonic time, seconds per token), oldest first.
        self._samples: dict[str, deque[tuple[float, float]]] = {}

    def record(self, node_id: str, seconds_per_token: float, now: float) -> None:
        """One finished attempt's latency per output token (time to first token included)."""
        if not (math.isfinite(seconds_per_token) and seconds_per_token >= 0.0):
            return
        samples = self._samples.get(node_id)
        if samples is None:
            samples = self._samples[node_id] = deque(maxlen=self.policy.max_samples)
        samples.append((now, seconds_per_token))
        self._expire(samples, now)

    def forget(self, node_id: str) -> None:
        """The node was removed: drop its samples."""
        self._samples.pop(node_id, None)

    def typical(self, node_id: str, now: float) -> float | None:
        """The node's typical latency (median in the window), or None while not judged."""
        values = self._judged_values(node_id, now)
        return None if values is None else _median(values)

    def outliers(self, candidates: Sequence[str], now: float) -> list[str]:
        """Among ``candidates`` (the healthy node ids), the ones to eject now, worst first.

        The returned nodes' samples are cleared, so they are judged afresh once re-admitted.
        """
        typicals: list[tuple[float, str]] = []
        for node_id in dict.fromkeys(candidates):
            values = self._judged_values(node_id, now)
            if values is not None:
                typicals.append((_median(values), node_id))
        judged = len(typicals)
        if judged < 2:
            return []
        # Nudge so 0.3 * 10 gives 3, not 2; and keep at least one judged node in.
        cap = min(judged - 1, math.floor(self.policy.max_ejected_fraction * judged + 1e-9))
        if cap <= 0:
            return []
        typicals.sort()
        values = [typical for typical, _ in typicals]
        found: list[tuple[float, str]] = []
        for i, (typical, node_id) in enumerate(typicals):
            peers = _median_without(values, i)
            if typical > self.policy.factor * peers and typical - peers >= self.policy.min_floor_s:
                ratio = typical / peers if peers > 0.0 else math.inf
                found.append((ratio, node_id))
        found.sort(key=lambda item: item[0], reverse=True)
        ejected = [node_id for _, node_id in found[:cap]]
        for node_id in ejected:
            self._samples.pop(node_id, None)
        return ejected

    def _judged_values(self, node_id: str, now: float) -> list[float] | None:
        """The node's in-window latencies, sorted, if it has enough to be judged."""
        samples = self._samples.get(node_id)
        if samples is None:
            return None
        self._expire(samples, now)
        if not samples:
            del self._samples[node_id]
            return None
        if len(samples) < self.policy.min_samples:
            return None
        return sorted(value for _, value in samples)

    def _expire(self, samples: deque[tuple[float, float]], now: float) -> None:
        horizon = now - self.policy.window_s
        while samples and samples[0][0] < horizon:
            samples.popleft()
