"""Stall detection: an attempt whose node produces nothing for too long is failed over.

A node can pass every health check and still not produce (a wedged engine step, a GPU stuck
in a kernel, a process that answers probes but starves its requests). Dispatch registers each
attempt here and stamps it at every output; one timer task, running only while attempts are
in flight, cancels the attempts silent for longer than their bound, and dispatch fails them
over with resume and counts the stall against the node.

The bound follows the request and the node's recent history (``StallPolicy.bound``): before
the first output, the larger of the floor (``--stall-timeout``) and ``factor`` times the node's
usual time to first output, times how far the node's requests exceed its capacity (a queued
request waits its turn), plus an allowance per prompt token; after it, the larger of the floor
and ``factor`` times the node's usual longest gap between outputs. A node that is
uniformly slow is not a stalled one: it is left to latency outlier ejection
(``coordinator.outliers``).

Stamping costs a clock read per output message; the timer scans the watched attempts a few
times per floor, so the per-message path stays free of timers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator import clock
from coordinator.registry import Node
from omni_rpc import config


@dataclass(frozen=True)
class StallPolicy:
    # The least silence that counts as a stall, in seconds; 0 turns stall detection off.
    timeout_s: float = config.STALL_TIMEOUT_S
    factor: float = config.STALL_FACTOR
    prefill_s_per_token: float = config.STALL_PREFILL_S_PER_TOKEN

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def bound(self, watched: Watched) -> float:
        """How long ``watched`` may stay silent from its last output (or its start)."""
        if watched.outputs == 0:
            node = watched.node
            # More requests on the node than it runs at once: this one may wait in its queue.
            queued = max(1.0, node.in_flight / max(1, node.capacity))
            return max(self.timeout_s, self._usual(watched)) * queued + self._prefill(watched)
        return max(self.timeout_s, self._usual(watched))

    def expected_silence(self, watched: Watched) -> float:
        """The silence a node is blamed for when the caller's deadline ends it: longer than it
        usually takes by ``factor``, and at least ``config.STALL_BLAME_MIN_S`` (plus, before the
        first output, the prompt's prefill allowance)."""
        return max(config.STALL_BLAME_MIN_S, self._usual(watched)) + self._prefill(watched)

    def _usual(self, watched: Watched) -> float:
        """``factor`` times what the node usually takes for what ``watched`` waits for."""
        node = watched.node
        usual = node.usual_first_output_s if watched.outputs == 0 else node.usual_gap_s
        return self.factor * usual

    def _prefill(self, watched: Watched) -> float:
        """Before the first output, the allowance for prefilling the prompt."""
        return self.prefill_s_per_token * watched.prompt_tokens if watched.outputs == 0 else 0.0


@dataclass(eq=False)
class Watched:
    """One attempt under watch: dispatch stamps it at every output."""

    node: Node
    prompt_tokens: int
    # Called once, with the reason, when the attempt is found stalled.
    on_stall: Callable[[str], None]
    started: float = field(default_factory=clock.now)
    last_output: float = 0.0
    first_output: float = 0.0
    outputs: int = 0
    longest_gap: float = 0.0
    # The relay is handing an output to the client: the time it waits is not the node's.
    client_reading: bool = False

    def __post_init__(self) -> None:
        self.last_output = self.started

    def stamp(self, now: float) -> None:
        gap = now - self.last_output
        if self.outputs == 0:
            self.first_output = now
        elif gap > self.longest_gap:
            self.longest_gap = gap
        self.outputs += 1
        self.last_output = now

    def resume(self, now: float) -> None:
        """The client took the last output: the node's silence counts from now."""
        self.client_reading = False
        self.last_output = now

    def silent_for(self, now: float) -> float:
        return now - self.last_output


def learn(node: Node, watched: Watched) -> None:
    """Fold a successful attempt into the node's usual times (EWMA)."""
    if watched.outputs == 0:
        return
    node.usual_first_output_s = _ewma(
        node.usual_first_output_s, watched.first_output - watched.started
    )
    if watched.outputs > 1:
        node.usual_gap_s = _ewma(node.usual_gap_s, watched.longest_gap)


def _ewma(usual: float, sample: float) -> float:
    """``usual`` moved towards ``sample`` (0 is "not known yet": the sample itself)."""
    if usual == 0.0:
        return sample
    return usual + config.STALL_HISTORY_WEIGHT * (sample - usual)


class StallWatch:
    """The watched attempts of one dispatcher, and the timer that finds the stalled ones.

    ``on_tick`` (if given) runs at every scan with the current time: the dispatcher's other
    periodic duty (latency outlier evaluation) rides on the same timer.
    """

    def __init__(self, policy: StallPolicy, on_tick: Callable[[float], None] | None = None) -> None:
        self.policy = policy
        self.on_tick = on_tick
        self._watched: set[Watched] = set()
        self._timer: asyncio.Task[None] | None = None
        # A few scans per floor, so a stall is found within about a quarter of its bound late.
        self.scan_every_s = min(1.0, max(0.05, policy.timeout_s / 4)) if policy.enabled else 1.0

    def watch(self, node: Node, prompt_tokens: int, on_stall: Callable[[str], None]) -> Watched:
        watched = Watched(node, prompt_tokens, on_stall)
        self._watched.add(watched)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._scan(), name="stall-watch")
        return watched

    def unwatch(self, watched: Watched) -> None:
        self._watched.discard(watched)

    async def _scan(self) -> None:
        try:
            while self._watched:
                await asyncio.sleep(self.scan_every_s)
                now = clock.now()
                if self.policy.enabled:
                    self.check(now)
                if self.on_tick is not None:
                    self.on_tick(now)
        finally:
            self._timer = None

    def check(self, now: float) -> None:
        """Cancel the attempts silent for longer than their bound."""
        for watched in list(self._watched):
            if watched.client_reading:
                continue
            bound = self.policy.bound(watched)
            silent = watched.silent_for(now)
            if silent > bound:
                self._watched.discard(watched)
                what = "its first output" if watched.outputs == 0 else "more output"
                watched.on_stall(
                    f"stalled: no output for {silent:.1f}s waiting for {what} (bound {bound:.1f}s)"
                )
