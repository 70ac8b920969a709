"""Per-node circuit breaker: passive outlier detection on real requests.

Health probes can pass while requests fail (a wedged GPU behind a live process). After
``threshold`` consecutive node-level failures the node is ejected for ``base_s * n`` seconds
(n = how many times it has been ejected, forgotten after ``max_s`` of good behaviour), capped
at ``max_s``, as Envoy's outlier detection does. Failures while the node is already out of
rotation do not count: one incident with many streams in flight is one incident. While
ejected, passing probes do not re-admit it; afterwards they do (half-open), and
one successful request closes the breaker.

Times are monotonic seconds passed in by the caller (``coordinator.clock.now()``), so the
breaker is a pure state machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from omni_rpc import config


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = config.BREAKER_CONSECUTIVE_FAILURES
    base_s: float = config.BREAKER_BASE_EJECTION_S
    max_s: float = config.BREAKER_MAX_EJECTION_S


@dataclass
class CircuitBreaker:
    policy: BreakerPolicy
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self, now: float) -> float:
        """Count a failure; return the ejection time in seconds if this one trips it, else 0."""
        self._forgive(now)
        self.consecutive_failures += 1
        if self.consecutive_failures < self.policy.threshold:
            return 0.0
        return self.eject(now)

    def eject(self, now: float) -> float:
        """Open the breaker now (also for other outlier verdicts, e.g. latency); return the
        ejection time in seconds, which grows with the number of ejections."""
        self._forgive(now)
        self.ejections += 1
        self.consecutive_failures = 0
        duration = min(self.policy.max_s, self.policy.base_s * self.ejections)
        self.ejected_until = now + duration
        return duration

    def _forgive(self, now: float) -> None:
        if self.ejections and now - self.ejected_until > self.policy.max_s:
            # Well-behaved for longer than the longest ejection since the last one: forgive
            # the history, so one bad day does not cost maximal ejections forever.
            self.ejections = 0

    def is_open(self, now: float) -> bool:
        return now < self.ejected_until
