"""The coordinator's one clock for deadlines, backoff and ejections: the event loop's.

``loop.time()`` is monotonic (``time.monotonic`` by default), and reading it through the
running loop lets in-process tests run the coordinator on virtual time (tests/unit/clock.py):
a deadline, a backoff or a 30-second ejection passes in a test without anyone waiting.
Wall-clock times (``time.time``) are kept only for display (joined_at, state_since).
"""

from __future__ import annotations

import asyncio
import time


def now() -> float:
    """Monotonic seconds on the running loop's clock."""
    return asyncio.get_running_loop().time()


def to_wall(monotonic: float) -> float:
    """A moment on the loop's clock as a Unix timestamp (for operators' displays)."""
    return time.time() + (monotonic - now())
