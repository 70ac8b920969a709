"""The per-node circuit breaker (coordinator/circuit.py): a pure state machine on given times."""

from __future__ import annotations

import pytest

from coordinator.circuit import BreakerPolicy, CircuitBreaker
from omni_rpc import config

POLICY = BreakerPolicy(threshold=3, base_s=30.0, max_s=100.0)


def trip(breaker: CircuitBreaker, now: float) -> float:
    """Fail ``threshold`` times at ``now``; return what the last failure returned."""
    for _ in range(breaker.policy.threshold - 1):
        assert breaker.record_failure(now) == 0.0
    return breaker.record_failure(now)


def test_default_policy_comes_from_config() -> None:
    assert BreakerPolicy() == BreakerPolicy(
        threshold=config.BREAKER_CONSECUTIVE_FAILURES,
        base_s=config.BREAKER_BASE_EJECTION_S,
        max_s=config.BREAKER_MAX_EJECTION_S,
    )


def test_a_fresh_breaker_is_closed() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.consecutive_failures == 0
    assert breaker.ejections == 0
    assert not breaker.is_open(0.0)
    assert not breaker.is_open(1e9)


def test_trips_exactly_at_the_threshold() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.record_failure(10.0) == 0.0
    assert breaker.consecutive_failures == 1
    assert breaker.record_failure(11.0) == 0.0
    assert breaker.consecutive_failures == 2
    assert not breaker.is_open(11.0)
    assert breaker.record_failure(12.0) == 30.0
    assert breaker.ejections == 1
    assert breaker.ejected_until == 42.0
    # The count starts over once it tripped.
    assert breaker.consecutive_failures == 0
    assert breaker.is_open(12.0)


def test_threshold_of_one_trips_on_every_failure() -> None:
    breaker = CircuitBreaker(BreakerPolicy(threshold=1, base_s=5.0, max_s=50.0))
    assert breaker.record_failure(0.0) == 5.0
    assert breaker.record_failure(6.0) == 10.0
    assert breaker.ejections == 2


def test_ejection_grows_as_base_times_n_and_is_capped_at_max() -> None:
    breaker = CircuitBreaker(POLICY)
    durations = []
    now = 0.0
    for _ in range(6):
        duration = trip(breaker, now)
        durations.append(duration)
        assert breaker.ejected_until == now + duration
        # Fail again right after the ejection ends: well within max_s, nothing forgiven.
        now = breaker.ejected_until + 1.0
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0]
    assert breaker.ejections == 6


def test_success_resets_the_consecutive_count() -> None:
    breaker = CircuitBreaker(POLICY)
    assert breaker.record_failure(0.0) == 0.0
    assert breaker.record_failure(0.0) == 0.0
    breaker.record_success()
    assert breaker.consecutive_failures == 0
    assert breaker.record_failure(0.0) == 0.0
    assert breaker.record_failure(0.0) == 0.0
    assert breaker.ejections == 0
    assert not breaker.is_open(0.0)
    # The third failure in a row (counting from the success) trips it.
    assert breaker.record_failure(0.0) == 30.0


def test_success_does_not_close_an_open_ejection_window_or_forget_ejections() -> None:
    breaker = CircuitBreaker(POLICY)
    trip(breaker, 0.0)
    breaker.record_success()
    assert breaker.is_open(10.0)
    assert breaker.ejections == 1


def test_is_open_window_edges() -> None:
    breaker = CircuitBreaker(POLICY)
    trip(breaker, 100.0)
    assert breaker.ejected_until == 130.0
    assert breaker.is_open(100.0)
    assert breaker.is_open(129.999)
    # Half-open from the ejection's end on, inclusive.
    assert not breaker.is_open(130.0)
    assert not breaker.is_open(130.001)


def test_history_is_forgiven_after_max_s_of_good_behaviour() -> None:
    breaker = CircuitBreaker(POLICY)
    assert trip(breaker, 0.0) == 30.0  # ejected until 30
    # More than max_s (100) after the ejection ended: the next trip is a first one again.
    now = 30.0 + 100.0 + 0.5
    assert trip(breaker, now) == 30.0
    assert breaker.ejections == 1
    assert breaker.ejected_until == now + 30.0


def test_history_is_not_forgiven_at_exactly_max_s() -> None:
    breaker = CircuitBreaker(POLICY)
    trip(breaker, 0.0)  # ejected until 30
    assert trip(breaker, 30.0 + 100.0) == 60.0
    assert breaker.ejections == 2


def test_forgiveness_resets_from_a_capped_history() -> None:
    breaker = CircuitBreaker(POLICY)
    now = 0.0
    for _ in range(5):
        trip(breaker, now)
        now = breaker.ejected_until
    assert breaker.ejections == 5
    last_end = breaker.ejected_until
    # A single failure long after the last ejection forgives the history at once...
    assert breaker.record_failure(last_end + 101.0) == 0.0
    assert breaker.ejections == 0
    # ...and the trip that follows is ejection #1 of base length.
    assert breaker.record_failure(last_end + 102.0) == 0.0
    assert breaker.record_failure(last_end + 103.0) == 30.0
    assert breaker.ejections == 1


@pytest.mark.parametrize("threshold", [2, 5])
def test_failures_below_the_threshold_never_open_it(threshold: int) -> None:
    breaker = CircuitBreaker(BreakerPolicy(threshold=threshold, base_s=1.0, max_s=2.0))
    for i in range(threshold - 1):
        assert breaker.record_failure(float(i)) == 0.0
    assert not breaker.is_open(float(threshold))
    assert breaker.ejections == 0
    assert breaker.consecutive_failures == threshold - 1
