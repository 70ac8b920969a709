"""Fixtures of the in-process tests: a virtual clock, fake nodes, a registry over them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from coordinator.circuit import BreakerPolicy
from coordinator.registry import Registry
from tests.unit.clock import VirtualClock
from tests.unit.fakes import FakeFleet


@pytest.fixture
async def clock() -> AsyncIterator[VirtualClock]:
    """Run the test's event loop on virtual time (see tests/unit/clock.py)."""
    virtual = VirtualClock()
    with virtual.attach(asyncio.get_running_loop()):
        yield virtual


@pytest.fixture
def fleet() -> FakeFleet:
    return FakeFleet()


@pytest.fixture
async def registry(clock: VirtualClock, fleet: FakeFleet) -> AsyncIterator[Registry]:
    reg = Registry(fleet, BreakerPolicy(threshold=3, base_s=30.0, max_s=300.0), readmit_after=2)
    yield reg
    await reg.close()
