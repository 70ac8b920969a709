"""Exponential backoff with full jitter, the one retry-delay policy used everywhere.

Full jitter (a uniform draw in [0, min(cap, base * 2**n)]) spreads retries of many clients
so they do not hit a recovering node in lock step (AWS architecture blog, "Exponential
Backoff And Jitter").
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

# One generator for every Backoff: seeding a new one per request reads the OS entropy pool on
# the request path (measured at about 1% of the coordinator's time).
_SHARED_RNG = random.Random()


@dataclass
class Backoff:
    base_s: float
    cap_s: float
    rng: random.Random = field(default=_SHARED_RNG)
    attempts: int = 0

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        return min(self.cap_s, self.base_s * 2.0**self.attempts)

    def next_delay(self) -> float:
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempts += 1
        return delay

    def next_ceiling(self) -> float:
        """The next delay without jitter (for probes, where spreading matters less than
        a predictable pace)."""
        delay = self.ceiling()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0

    async def sleep(self, limit_s: float | None = None) -> float:
        """Sleep the next delay, never past ``limit_s`` (what remains of a deadline)."""
        delay = self.next_delay()
        if limit_s is not None:
            delay = max(0.0, min(delay, limit_s))
        await asyncio.sleep(delay)
        return delay
