"""A time-skipping event loop clock for in-process tests.

While a test runs against fakes, nothing outside the process can wake the loop, so whenever
the loop would block waiting for its next timer, that wait is skipped: the clock jumps to the
timer and the loop goes on at once. ``asyncio.sleep``, ``wait_for``, deadlines and backoff all
run on ``loop.time()``, so a test of a 30-second ejection or a 5-second deadline takes
milliseconds and is exact: no test depends on how busy the machine is.

The coordinator reads time through the running loop (``coordinator.clock``), which is what
makes this possible.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class VirtualClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._loop: asyncio.AbstractEventLoop | None = None

    def time(self) -> float:
        return self.now

    @contextmanager
    def attach(self, loop: asyncio.AbstractEventLoop) -> Iterator[VirtualClock]:
        """Make ``loop`` run on this clock (until the block ends)."""
        selector: selectors.BaseSelector = loop._selector  # type: ignore[attr-defined]
        real_select = selector.select

        def select(timeout: float | None = None) -> list[Any]:
            # Ready I/O (the loop's self-pipe, a thread's call_soon_threadsafe) first; if
            # nothing is ready and the loop would sleep until its next timer, skip the sleep.
            events = real_select(0)
            if events or timeout == 0:
                return events
            if timeout is None:
                # No timer at all: only outside I/O could wake the loop; wait for it for real.
                return real_select(None)
            self.now += timeout
            return []

        self.now = max(self.now, loop.time())
        loop.time = self.time  # type: ignore[method-assign]
        selector.select = select  # type: ignore[method-assign]
        self._loop = loop
        try:
            yield self
        finally:
            del loop.time
            selector.select = real_select  # type: ignore[method-assign]
            self._loop = None

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass (every timer due in it fires)."""
        await asyncio.sleep(seconds)
