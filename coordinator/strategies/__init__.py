"""Load-balancing strategies, one module each, behind ``Strategy``."""

from __future__ import annotations

from coordinator.strategies.base import Candidate, Strategy
from coordinator.strategies.cache_aware import (
    DEFAULT_BALANCE_ABS_THRESHOLD,
    DEFAULT_BALANCE_REL_THRESHOLD,
    CacheAware,
)
from coordinator.strategies.consistent_hash import ConsistentHash
from coordinator.strategies.least_loaded import LeastLoaded
from coordinator.strategies.power_of_two import PowerOfTwo
from coordinator.strategies.round_robin import RoundRobin

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RoundRobin, LeastLoaded, PowerOfTwo, CacheAware, ConsistentHash)
}


def make_strategy(
    name: str,
    *,
    balance_abs_threshold: int = DEFAULT_BALANCE_ABS_THRESHOLD,
    balance_rel_threshold: float = DEFAULT_BALANCE_REL_THRESHOLD,
) -> Strategy:
    """The strategy called ``name`` (the balance thresholds are cache_aware's); ValueError
    listing the known ones otherwise."""
    if name not in STRATEGIES:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown load balancing strategy {name!r} (known: {known})")
    if name == CacheAware.name:
        return CacheAware(balance_abs_threshold, balance_rel_threshold)
    return STRATEGIES[name]()


__all__ = [
    "STRATEGIES",
    "CacheAware",
    "Candidate",
    "ConsistentHash",
    "LeastLoaded",
    "PowerOfTwo",
    "RoundRobin",
    "Strategy",
    "make_strategy",
]
