"""Load-balancing strategies, one module each, behind ``Strategy``."""

from __future__ import annotations

from coordinator.strategies.base import Candidate, Strategy
from coordinator.strategies.cache_aware import CacheAware
from coordinator.strategies.consistent_hash import ConsistentHash
from coordinator.strategies.least_loaded import LeastLoaded
from coordinator.strategies.power_of_two import PowerOfTwo
from coordinator.strategies.round_robin import RoundRobin

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RoundRobin, LeastLoaded, PowerOfTwo, CacheAware, ConsistentHash)
}


def make_strategy(name: str) -> Strategy:
    """The strategy called ``name``; ValueError listing the known ones otherwise."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown load balancing strategy {name!r} (known: {known})") from None


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
