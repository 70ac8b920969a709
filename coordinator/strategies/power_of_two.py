"""Power of two choices: the less loaded of two random nodes.

Nearly as good as least loaded at spreading load, without every router herding onto the
same "least loaded" node when several coordinators share a fleet.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from coordinator.prefix import RequestPrefix
from coordinator.strategies.base import Candidate, Strategy
from coordinator.strategies.least_loaded import utilization


class PowerOfTwo(Strategy):
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(
        self, candidates: Sequence[Candidate], key: str = "", prefix: RequestPrefix | None = None
    ) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if utilization(a) <= utilization(b) else b
