"""Chaos harness: a real cluster under load while a seeded fault driver breaks its nodes.

``run_chaos(seed, requests, concurrency)`` starts a coordinator (``ChaosConfig.coordinators``
of them side by side) and ``nodes`` simulated agents as separate processes (``LocalCluster``),
then runs three things at once in one event loop:

* **load**: at least ``requests`` streamed Generate calls through the SDK, ``concurrency`` at
  a time, each with its own prompt (text or token ids), sampling seed, ``max_tokens`` and
  sometimes a stop string, all drawn from ``random.Random(f"chaos-load-{seed}")``; more while
  the first round of faults (one of each kind) is not repaired yet, so every kind meets load;
* **fault driver**: every 0.3-1.0 s it picks a fault kind and a healthy agent with
  ``random.Random(f"chaos-faults-{seed}")`` and injects it: ``kill`` (SIGKILL, restarted
  later), ``stop`` (SIGSTOP, SIGCONT later), ``dead`` (SIGUSR1: the engine stops, revived by a
  second SIGUSR1) or ``fail_requests`` (SIGUSR2: the engine fails every request while its
  health checks pass, switched off by a second SIGUSR2). The first four faults are one of each
  kind, in a seeded order. At most ``nodes - 2`` agents are under a fault at once (a fault lasts
  until the coordinator reports the node healthy again), so two healthy nodes always remain;
* **monitor**: a thread polls ``ListNodes`` every 50 ms and records each node's state, its
  ``state_since`` (the coordinator's own time of the change) and reason.

With ``coordinators=2`` (CLI ``--coordinators 2``) the agents join both coordinators, the SDK
holds both addresses (round robin; keepalive 1 s + 1 s, and the agents' too, so a frozen
coordinator is given up within about 2 s), and the driver's kinds include coordinator faults:
``coordinator_kill`` (SIGKILL, restarted on its address 0.5-2 s later), ``coordinator_stop``
(SIGSTOP for 2.5-3.5 s, longer than the keepalive bound, then SIGCONT) and
``coordinator_restart`` (``restart_coordinator``: SIGTERM, its calls drain, a new process on
the address). The first round is then one fault of each of the seven kinds. At most one
coordinator is under a fault at once, so the other always serves: a coordinator fault lasts
until the coordinator is back and reports every agent that is under no fault healthy (its
recovery). There is one monitor per coordinator. Each coordinator keeps its own registry and
detects agent faults on its own, so an agent fault's detection is measured in each
coordinator's view, but for a coordinator under a fault of its own between the injection and
its detection (blind to it, counted neither way); an agent fault lasts until every
coordinator under no fault reports the node healthy again, and a node to break must be healthy
in all of their views. A monitor failing to reach its coordinator is a failure only outside
that coordinator's own faults. With one coordinator, nothing of this applies: same kinds, same
seeded schedule as ever.

Every request's output is checked token for token against ``simulate(...)``, the simulated
engine's exact output (text and finish reason too, and exactly one final message). A request
that ends in an error counts as lost unless the error is a clear ``GenerationError`` and the
monitor (every monitor, with several coordinators) saw no healthy node in the second before
it; a request that overlapped a coordinator fault is never excused: coordinator faults must
lose nothing. Since the driver always leaves healthy nodes, ``lost`` must be 0. With several
coordinators the attempt numbers of a stream start again from 1 on the coordinator it moves
to; a stream that moved (attempt numbers going back, or a coordinator's log saying it resumed
from the client's tokens) with no coordinator fault under way fails the run.

Figures: detection time per fault (the coordinator's ``state_since`` of the first UNHEALTHY
state after the injection, minus the injection time; same machine, same clock), the path that
detected it (the state reason), the time until the node was healthy again after the repair,
and for requests that failed over (a delta with ``attempt`` > 1) the latency added, measured
against the median latency of undisturbed requests of the same output length (buckets of 10
tokens), grouped by the fault behind the first failed attempt (from the coordinator's log),
and the stall: the longest wait for the first delta of a new attempt. Per coordinator fault
kind: how many, the stall (of the streams in flight when the fault began, the longest wait
from the injection to the stream's first delta after it; a stream that failed over between
nodes meanwhile without leaving its coordinator is left out, its wait is an agent fault's),
how many of those streams moved to the other coordinator from their resume point, and the
recovery (from the repair, SIGCONT or the new process listening, to every agent under no fault
healthy in that coordinator's view, in an answer to a poll sent after the repair).

The schedule of decisions (kinds, targets, durations) is a function of the run's seed; the exact
moments depend on the machine, so two runs of one seed differ in detail, not in kind.

CLI: ``python -m tests.chaos.harness --seed 42 --requests 5000 --concurrency 64 [--nodes N]
[--strategy S] [--workers N] [--coordinators N] [--log-dir DIR] [--markdown FILE]
[--json FILE]``. It prints the report and exits 1 if a check failed. ``--json`` writes every
fault and every failed request (with its request_id) for a post-mortem against the
per-process logs in the log directory (``coordinator.log``, ``coordinator-1.log``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from node_agent.engines.sim import VOCAB_SIZE, Completion, simulate, word
from omni_rpc import DistributedOrchestrator, GenerationError
from omni_rpc.launchers.local import LocalCluster, coordinator_name
from omni_rpc.sdk.client import CoordinatorClient, CoordinatorUnreachable
from omni_rpc.v1 import coordinator_pb2

HEALTHY = coordinator_pb2.NODE_STATE_HEALTHY
UNHEALTHY = coordinator_pb2.NODE_STATE_UNHEALTHY

# Agent faults (every run has them).
KINDS = ("kill", "stop", "dead", "fail_requests")
# Coordinator faults (runs with two coordinators or more; see ChaosConfig.coordinators).
COORDINATOR_KINDS = ("coordinator_kill", "coordinator_stop", "coordinator_restart")
# How long each kind of fault lasts before it is repaired, seconds. A freeze must outlast the
# active check's bound (interval + two timeouts = 1.5 s here: a check that gets no answer
# fails after two timeouts, a late answer is only slow) to be seen at all. A coordinator's
# freeze outlasts the clients' and agents' keepalive bound (1 s + 1 s), so its streams move to
# the other coordinator; a killed coordinator stays down this long before its restart; a
# restart (SIGTERM, its in-flight calls drain, a new process on the same address) begins at
# once.
DURATIONS: dict[str, tuple[float, float]] = {
    "kill": (0.5, 2.0),
    "stop": (2.0, 3.5),
    "dead": (0.5, 2.0),
    "fail_requests": (1.0, 2.5),
    "coordinator_kill": (0.5, 2.0),
    "coordinator_stop": (2.5, 3.5),
    "coordinator_restart": (0.0, 0.0),
}
KIND_TITLES = {
    "kill": "process killed (SIGKILL, restarted)",
    "stop": "process frozen (SIGSTOP, SIGCONT)",
    "dead": "engine dead (SIGUSR1)",
    "fail_requests": "engine fails requests (SIGUSR2)",
    "coordinator_kill": "coordinator killed (SIGKILL, restarted)",
    "coordinator_stop": "coordinator frozen (SIGSTOP, SIGCONT)",
    "coordinator_restart": "coordinator restarted (SIGTERM, drained)",
}
# The kinds repaired by starting a new process.
RESTARTED = ("kill", "coordinator_kill", "coordinator_restart")
OUTCOMES = ("ok", "excused", "lost", "duplicated", "reordered", "truncated", "corrupt")

_WORDS = [word(t).strip() for t in range(0, VOCAB_SIZE, 7)]


@dataclass(frozen=True)
class ChaosConfig:
    """The cluster's and the driver's settings, sized for a short run on a small machine."""

    health_check_interval: float = 0.5
    health_check_timeout: float = 0.5
    max_retries: int = 6
    breaker_failures: int = 5
    breaker_base_ejection: float = 1.0
    breaker_max_ejection: float = 3.0
    strategy: str = "round_robin"
    sim_ttft_ms: float = 5.0
    sim_itl_ms: float = 4.0
    min_tokens: int = 16
    max_tokens: int = 96
    # Share of requests with a token-id prompt, and with a stop string.
    token_prompt_share: float = 0.2
    stop_share: float = 0.15
    fault_gap_s: tuple[float, float] = (0.3, 1.0)
    request_timeout_s: float = 30.0
    # How long a repaired node may take to be healthy again before it counts as not recovered.
    recovery_timeout_s: float = 30.0
    monitor_interval_s: float = 0.05
    # A request error is excused if no node was healthy within this window before it.
    no_healthy_window_s: float = 1.0
    # The load goes on past the requested count until the first round of faults (one of each
    # kind) is over and the nodes are healthy again, so every kind meets load; at most this long.
    first_round_limit_s: float = 90.0
    # The coordinator's processes serving Generate (`--workers`; above 1, plus a control process).
    workers: int = 1
    # Coordinators side by side (agents join each, the SDK holds every address). With two or
    # more, the fault driver breaks coordinators too (COORDINATOR_KINDS), one at a time.
    coordinators: int = 1
    # With several coordinators: the SDK's and the agents' keepalive (ping every
    # keepalive_time, give up after keepalive_timeout), which bounds a frozen coordinator.
    keepalive_time_s: float = 1.0
    keepalive_timeout_s: float = 1.0

    @property
    def kinds(self) -> tuple[str, ...]:
        """The fault kinds of a run: agent faults, and coordinator faults with several."""
        return KINDS if self.coordinators < 2 else KINDS + COORDINATOR_KINDS

    def coordinator_args(self) -> list[str]:
        return [
            "--health-check-timeout",
            str(self.health_check_timeout),
            "--breaker-failures",
            str(self.breaker_failures),
            "--breaker-base-ejection",
            str(self.breaker_base_ejection),
            "--breaker-max-ejection",
            str(self.breaker_max_ejection),
            # Faults are injected into the same nodes again and again, soon after each repair:
            # flap damping holds them out briefly, not for minutes.
            "--flap-hold",
            "0.25",
            "--flap-max-hold",
            "1",
            "--workers",
            str(self.workers),
        ]

    def agent_args(self) -> list[str]:
        args = ["--sim-ttft-ms", str(self.sim_ttft_ms), "--sim-itl-ms", str(self.sim_itl_ms)]
        if self.coordinators > 1:
            # A frozen coordinator's requests are aborted in the engines within this bound.
            args += [
                "--keepalive-time",
                str(self.keepalive_time_s),
                "--keepalive-timeout",
                str(self.keepalive_timeout_s),
            ]
        return args


# -- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str | tuple[int, ...]
    max_tokens: int
    seed: int
    stop: tuple[str, ...] = ()

    def expected(self) -> Completion:
        if isinstance(self.prompt, str):
            return simulate(self.prompt, max_tokens=self.max_tokens, seed=self.seed, stop=self.stop)
        return simulate(
            prompt_token_ids=self.prompt, max_tokens=self.max_tokens, seed=self.seed, stop=self.stop
        )


def iter_specs(seed: int, cfg: ChaosConfig) -> Iterator[RequestSpec]:
    """The endless, seeded sequence of requests of a run (request i depends only on ``seed``)."""
    rng = random.Random(f"chaos-load-{seed}")
    for index in itertools.count():
        max_tokens = rng.randint(cfg.min_tokens, cfg.max_tokens)
        sampling_seed = rng.randrange(1 << 31)
        prompt: str | tuple[int, ...]
        if rng.random() < cfg.token_prompt_share:
            prompt = tuple(rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 12)))
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 10)))
            prompt = f"chaos {seed} #{index}: {words}"
        # A stop string is a space and a syllable: it matches where a word starts with it.
        stop = (word(rng.randrange(VOCAB_SIZE))[:3],) if rng.random() < cfg.stop_share else ()
        yield RequestSpec(index, prompt, max_tokens, sampling_seed, stop)


def make_specs(seed: int, count: int, cfg: ChaosConfig) -> list[RequestSpec]:
    return list(itertools.islice(iter_specs(seed, cfg), count))


@dataclass
class RequestRecord:
    spec: RequestSpec
    started_at: float = 0.0  # wall clock
    ended_at: float = 0.0  # wall clock
    latency_s: float = 0.0
    outcome: str = ""
    detail: str = ""
    # Highest attempt number seen in a delta (1: served by the first node it went to).
    attempts: int = 0
    nodes: list[str] = field(default_factory=list)
    # Attempts that delivered tokens (more than one: the stream was resumed mid-way).
    token_attempts: int = 0
    # Longest wait for the first delta of a later attempt (failed-over requests only).
    stall_s: float | None = None
    expected_tokens: int = 0
    request_id: str = ""
    # Fault kinds behind each failed attempt, in order (from the coordinator's log).
    causes: list[str] = field(default_factory=list)
    # Wall-clock arrival of each delta and its attempt number (for the stall across a
    # coordinator fault).
    arrivals: list[float] = field(default_factory=list, repr=False)
    arrival_attempts: list[int] = field(default_factory=list, repr=False)
    # With several coordinators: when the attempt numbers started again from a lower one
    # (wall clock), i.e. the stream went on through another coordinator.
    coordinator_switches: list[float] = field(default_factory=list)
    # The stream was continued through another coordinator from a resume point (a coordinator's
    # log says "resumed_from_client_tokens").
    resumed_by_client: bool = False

    @property
    def failed_over(self) -> bool:
        return self.attempts > 1


def classify_output(
    expected: Completion, token_ids: list[int], text: str, finish_reason: str | None
) -> tuple[str, str]:
    """(outcome, detail) of a stream that ended without an error."""
    if token_ids == expected.token_ids:
        if text != expected.text:
            return "corrupt", f"text differs: {text[:60]!r} vs {expected.text[:60]!r}"
        if finish_reason != expected.finish_reason:
            return (
                "corrupt",
                f"finish_reason {finish_reason!r}, expected {expected.finish_reason!r}",
            )
        return "ok", ""
    got, want = collections.Counter(token_ids), collections.Counter(expected.token_ids)
    extra, missing = got - want, want - got
    first = next(
        (i for i, (a, b) in enumerate(zip(token_ids, expected.token_ids, strict=False)) if a != b),
        min(len(token_ids), len(expected.token_ids)),
    )
    where = f"{len(token_ids)} tokens for {len(expected.token_ids)}, first difference at {first}"
    if extra and not missing:
        return "duplicated", where
    if missing and not extra:
        return "truncated", where
    if not extra and not missing:
        return "reordered", where
    return "corrupt", where


# -- the coordinator's view ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    state: int
    state_since: float
    reason: str


class ClusterMonitor:
    """Polls ListNodes from a thread: the latest view, every state change seen, and a
    timeline of how many nodes were healthy."""

    def __init__(self, address: str, interval_s: float, index: int = 0) -> None:
        self.interval_s = interval_s
        self.address = address
        self.index = index  # the coordinator's index in the cluster
        self._client = CoordinatorClient(address, timeout_s=2.0)
        self._lock = threading.Lock()
        self._latest: dict[str, NodeView] = {}
        self.transitions: list[NodeView] = []
        self.sample_times: list[float] = []
        self.sample_healthy: list[int] = []
        # When the poll behind the latest sample was sent (its answer is no older than this).
        self._latest_sent_at = 0.0
        self.poll_errors = 0
        # When each failed poll gave up (wall clock).
        self.error_times: list[float] = []
        self._stop = threading.Event()
        name = "chaos-monitor" if index == 0 else f"chaos-monitor-{index}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5.0)
        self._client.close()

    def latest(self) -> dict[str, NodeView]:
        with self._lock:
            return dict(self._latest)

    def last_sample_at(self) -> float:
        with self._lock:
            return self.sample_times[-1] if self.sample_times else 0.0

    def last_sample_sent_at(self) -> float:
        """When the poll behind the latest sample was sent: a view asked for after an event
        (a process thawed, say) says what the coordinator knew after it."""
        with self._lock:
            return self._latest_sent_at

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.time()
            try:
                nodes = self._client.nodes()
            except (CoordinatorUnreachable, grpc.RpcError):
                with self._lock:
                    self.poll_errors += 1
                    self.error_times.append(time.time())
                self._stop.wait(self.interval_s)
                continue
            now = time.time()
            views = {
                n.node_id: NodeView(
                    n.node_id, n.address, int(n.state), n.state_since, n.state_reason
                )
                for n in nodes
            }
            with self._lock:
                for view in views.values():
                    old = self._latest.get(view.node_id)
                    if old is None or (old.state, old.state_since, old.address) != (
                        view.state,
                        view.state_since,
                        view.address,
                    ):
                        self.transitions.append(view)
                self._latest = views
                self._latest_sent_at = sent
                self.sample_times.append(now)
                self.sample_healthy.append(sum(v.state == HEALTHY for v in views.values()))
            self._stop.wait(self.interval_s)

    def none_healthy_between(self, start: float, end: float) -> bool:
        """Whether some sample in [start, end] saw no healthy node."""
        with self._lock:
            lo = bisect.bisect_left(self.sample_times, start)
            hi = bisect.bisect_right(self.sample_times, end)
            return any(h == 0 for h in self.sample_healthy[lo:hi])


# -- faults ---------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    index: int  # the agent's index (a coordinator's, for a coordinator fault)
    injected_at: float  # wall clock, when the signal was sent
    planned_s: float
    address: str = ""  # the node's (or coordinator's) address when the fault began
    repaired_at: float | None = None  # the repair (SIGCONT, restart, mode off) was done
    # Agent fault: the node is healthy again at every coordinator under no fault. Coordinator
    # fault: it reports every agent under no fault healthy (a restarted one, from its new
    # registry; a thawed one, in an answer asked for after the thaw).
    healthy_again_at: float | None = None
    # The first detection of an agent fault: a coordinator's state_since of the UNHEALTHY state.
    detected_at: float | None = None
    detected_by: str = ""
    # Each coordinator's detection of an agent fault: its index -> (state_since, reason).
    detections: dict[int, tuple[float, str]] = field(default_factory=dict)
    # Coordinators under a fault of their own between this agent fault's injection and their
    # detection of it: what they saw of it is not counted (neither detected nor undetected).
    blind: list[int] = field(default_factory=list)
    recovery_timed_out: bool = False
    # The run ended before the planned repair (an undetected fault of this sort proves nothing).
    cut_short: bool = False
    # The repair itself failed (a restart that raised).
    error: str = ""
    # Coordinator faults: the streams in flight when it began, the longest wait of one of them
    # from the injection to its first delta after it, and how many of them went on through
    # another coordinator from their resume point.
    in_flight: int = 0
    stall_s: float | None = None
    moved: int = 0

    @property
    def on_coordinator(self) -> bool:
        return self.kind in COORDINATOR_KINDS

    @property
    def node_id(self) -> str:
        return coordinator_name(self.index) if self.on_coordinator else f"node-{self.index}"

    @property
    def detection_s(self) -> float | None:
        return None if self.detected_at is None else max(0.0, self.detected_at - self.injected_at)

    @property
    def recovery_s(self) -> float | None:
        if self.repaired_at is None or self.healthy_again_at is None:
            return None
        return max(0.0, self.healthy_again_at - self.repaired_at)

    def window(self, end: float) -> tuple[float, float]:
        """From the injection until healthy again (``end`` if it never was)."""
        return self.injected_at, self.healthy_again_at or end


class FaultDriver:
    """Injects faults on a seeded schedule: never more than ``max_active`` agents under a
    fault at once, and never more than one coordinator (with several, the others serve)."""

    def __init__(
        self,
        cluster: LocalCluster,
        monitors: ClusterMonitor | Sequence[ClusterMonitor],
        seed: int,
        cfg: ChaosConfig,
    ) -> None:
        self.cluster = cluster
        # One monitor per coordinator, by index.
        self.monitors = [monitors] if isinstance(monitors, ClusterMonitor) else list(monitors)
        self.monitor = self.monitors[0]
        self.cfg = cfg
        self.kinds = cfg.kinds
        self.rng = random.Random(f"chaos-faults-{seed}")
        self.max_active = max(1, cluster.num_nodes - 2)
        self.faults: list[FaultRecord] = []
        # Agent faults under way, by agent index.
        self.active: dict[int, FaultRecord] = {}
        # The coordinator fault under way, if any (it ends when the coordinator has recovered).
        self.coordinator_fault: FaultRecord | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarts: set[asyncio.Future[None]] = set()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        first_round = self.rng.sample(self.kinds, len(self.kinds))
        while not self._stop.is_set():
            if await self._stopped_within(self.rng.uniform(*self.cfg.fault_gap_s)):
                return
            kind = first_round.pop(0) if first_round else self.rng.choice(self.kinds)
            on_coordinator = kind in COORDINATOR_KINDS
            index = await (self._pick_coordinator() if on_coordinator else self._pick_target())
            if index is None:
                return
            fault = FaultRecord(kind, index, 0.0, self.rng.uniform(*DURATIONS[kind]))
            if on_coordinator:
                fault.address = self.cluster.coordinator_addresses[index]
                self.coordinator_fault = fault
            else:
                view = self._serving()[0].latest().get(fault.node_id)
                fault.address = view.address if view is not None else ""
                self.active[index] = fault
            self.faults.append(fault)
            fault.injected_at = time.time()
            self._inject(fault)
            task = asyncio.create_task(self._life(fault), name=f"fault:{kind}:{index}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def first_round_over(self) -> bool:
        """Whether one fault of each kind has been injected and repaired."""
        first = self.faults[: len(self.kinds)]
        return len(first) == len(self.kinds) and all(
            f.healthy_again_at is not None or f.recovery_timed_out or f.error for f in first
        )

    def coordinator_fault_between(self, start: float, end: float) -> bool:
        """Whether a coordinator was under a fault at some moment of [start, end]."""
        return any(
            f.on_coordinator and f.injected_at <= end and (f.healthy_again_at or end) >= start
            for f in self.faults
        )

    def _serving(self) -> list[ClusterMonitor]:
        """The monitors of the coordinators under no fault (never empty: at most one is)."""
        busy = self.coordinator_fault.index if self.coordinator_fault is not None else -1
        return [m for m in self.monitors if m.index != busy]

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _pick_target(self) -> int | None:
        """A node to break: healthy in the view of every coordinator under no fault, alive,
        under no fault; waits while ``max_active`` faults are running."""
        while not self._stop.is_set():
            if len(self.active) < self.max_active:
                views = [m.latest() for m in self._serving()]
                eligible = [
                    i
                    for i, agent in enumerate(self.cluster.agents)
                    if i not in self.active
                    and agent.alive
                    and all(
                        (view := latest.get(f"node-{i}")) is not None and view.state == HEALTHY
                        for latest in views
                    )
                ]
                if eligible:
                    return self.rng.choice(eligible)
            await self._stopped_within(0.05)
        return None

    async def _pick_coordinator(self) -> int | None:
        """A coordinator to break; waits while one is under a fault (or recovering)."""
        while not self._stop.is_set():
            if self.coordinator_fault is None:
                return self.rng.randrange(len(self.cluster.coordinators))
            await self._stopped_within(0.05)
        return None

    def _inject(self, fault: FaultRecord) -> None:
        if fault.on_coordinator:
            if fault.kind != "coordinator_restart":  # a restart begins in _life, at once
                sig = signal.SIGKILL if fault.kind == "coordinator_kill" else signal.SIGSTOP
                self.cluster.coordinators[fault.index].process.send_signal(sig)
            return
        process = self.cluster.agents[fault.index].process
        sig = {
            "kill": signal.SIGKILL,
            "stop": signal.SIGSTOP,
            "dead": signal.SIGUSR1,
            "fail_requests": signal.SIGUSR2,
        }[fault.kind]
        process.send_signal(sig)

    def _repair_signal(self, fault: FaultRecord) -> None:
        """The repair that is a signal (everything but restarting a process)."""
        if fault.repaired_at is not None or fault.kind in RESTARTED:
            return
        if fault.kind == "coordinator_stop":
            process = self.cluster.coordinators[fault.index].process
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
            fault.repaired_at = time.time()
            return
        process = self.cluster.agents[fault.index].process
        sig = {"stop": signal.SIGCONT, "dead": signal.SIGUSR1, "fail_requests": signal.SIGUSR2}
        if process.poll() is None:
            process.send_signal(sig[fault.kind])
        fault.repaired_at = time.time()

    async def _life(self, fault: FaultRecord) -> None:
        try:
            await asyncio.sleep(fault.planned_s)
            if fault.kind in RESTARTED:
                # Shielded: a restart under way when the run ends must finish before the
                # cluster stops, or its new process would outlive the cluster.
                restart = asyncio.ensure_future(asyncio.to_thread(self._restart, fault))
                self._restarts.add(restart)
                try:
                    await asyncio.shield(restart)
                except Exception as exc:  # the process did not come back: a failure
                    fault.error = f"restart failed: {type(exc).__name__}: {exc}"
                    return  # keep the slot: it is not faulted again
            else:
                self._repair_signal(fault)
            if fault.on_coordinator:
                fault.healthy_again_at = await self._wait_coordinator_recovered(fault)
            else:
                fault.healthy_again_at = await self._wait_healthy_again(fault)
            if fault.healthy_again_at is None:
                fault.recovery_timed_out = True
                return  # keep the slot: a node that never came back is not faulted again
            if fault.on_coordinator:
                self.coordinator_fault = None
            else:
                self.active.pop(fault.index, None)
        finally:
            self._repair_signal(fault)  # when cancelled at the end of the run

    def _restart(self, fault: FaultRecord) -> None:
        if fault.on_coordinator:
            if fault.kind == "coordinator_kill":
                self.cluster.coordinators[fault.index].process.wait()
            else:
                fault.injected_at = time.time()  # restart_coordinator sends SIGTERM first
            self.cluster.restart_coordinator(30.0, index=fault.index)
        else:
            self.cluster.agents[fault.index].process.wait()
            self.cluster.start_agent(fault.index)
        fault.repaired_at = time.time()

    async def _wait_healthy_again(self, fault: FaultRecord) -> float | None:
        """When the node is healthy again at every coordinator under no fault (in a sample
        taken after the repair; a killed node at its new address)."""
        deadline = time.monotonic() + self.cfg.recovery_timeout_s
        repaired_at = fault.repaired_at or time.time()

        def healthy_at(monitor: ClusterMonitor) -> bool:
            fresh = monitor.last_sample_at() > repaired_at
            view = monitor.latest().get(fault.node_id)
            return (
                fresh
                and view is not None
                and view.state == HEALTHY
                and (fault.kind != "kill" or view.address != fault.address)
            )

        while time.monotonic() < deadline:
            if all(healthy_at(m) for m in self._serving()):
                return time.time()
            await asyncio.sleep(0.02)
        return None

    async def _wait_coordinator_recovered(self, fault: FaultRecord) -> float | None:
        """When the repaired coordinator reports every agent under no fault healthy, in an
        answer to a poll sent after the repair (a restart: the new process listens; a thaw:
        0.1 s after SIGCONT, for the thawed process first catches up with what broke while it
        was frozen: agents gave up its sessions and health streams)."""
        deadline = time.monotonic() + self.cfg.recovery_timeout_s
        repaired_at = fault.repaired_at or time.time()
        asked_after = repaired_at + (0.1 if fault.kind == "coordinator_stop" else 0.0)
        monitor = self.monitors[fault.index]
        while time.monotonic() < deadline:
            if monitor.last_sample_sent_at() > asked_after:
                latest = monitor.latest()
                if all(
                    (view := latest.get(f"node-{i}")) is not None and view.state == HEALTHY
                    for i in range(self.cluster.num_nodes)
                    if i not in self.active
                ):
                    return time.time()
            await asyncio.sleep(0.02)
        return None

    async def stop(self) -> None:
        """Inject nothing more; repair what is broken (killed agents and coordinators stay
        down unless their restart is under way)."""
        self._stop.set()
        for fault in self.faults:
            fault.cut_short = fault.repaired_at is None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._restarts, return_exceptions=True)
        for fault in self.faults:
            self._repair_signal(fault)

    def continue_all(self) -> None:
        """Safety net: no process may stay frozen (a SIGSTOPped process ignores SIGTERM)."""
        for child in [*self.cluster.coordinators, *self.cluster.agents]:
            if child.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGCONT)

    def killed_for_good(self) -> set[str]:
        """The processes (node ids, coordinator names) killed and not restarted."""
        return {
            f.node_id
            for f in self.faults
            if f.kind in ("kill", "coordinator_kill") and f.repaired_at is None
        }


def attribute_detections(
    faults: Sequence[FaultRecord],
    transitions: Sequence[NodeView],
    end: float,
    coordinator: int = 0,
) -> list[NodeView]:
    """Fill in each agent fault's detection by coordinator ``coordinator``, whose view
    ``transitions`` is; return the UNHEALTHY transitions no fault explains.

    A coordinator under a fault of its own between an agent fault's injection and its
    detection of it is blind to that fault (``FaultRecord.blind``: counted neither detected
    nor undetected), and the UNHEALTHY states it reports during its own fault (a new registry
    filling up, a thawed one catching up) are explained by that fault."""
    own = [f.window(end) for f in faults if f.on_coordinator and f.index == coordinator]

    def during_own(start: float, stop: float) -> bool:
        return any(a <= stop and start <= b for a, b in own)

    unexplained = []
    by_node: dict[str, list[FaultRecord]] = collections.defaultdict(list)
    for fault in faults:
        if not fault.on_coordinator:
            by_node[fault.node_id].append(fault)
    explained: set[int] = set()
    for node_faults in by_node.values():
        node_faults.sort(key=lambda f: f.injected_at)
        for i, fault in enumerate(node_faults):
            # A fault's window ends when the node is healthy again (or the next fault begins).
            limit = fault.healthy_again_at or end
            if i + 1 < len(node_faults):
                limit = min(limit, node_faults[i + 1].injected_at)
            first: NodeView | None = None
            for j, t in enumerate(transitions):
                if (
                    t.node_id == fault.node_id
                    and t.state == UNHEALTHY
                    and fault.injected_at - 0.005 <= t.state_since <= limit
                    and (fault.kind != "kill" or t.address == fault.address)
                ):
                    explained.add(j)
                    first = first or t
            seen_until = first.state_since if first is not None else limit
            if during_own(fault.injected_at, seen_until):
                fault.blind.append(coordinator)
            elif first is not None:
                fault.detections[coordinator] = (first.state_since, first.reason)
                if fault.detected_at is None or first.state_since < fault.detected_at:
                    fault.detected_at, fault.detected_by = first.state_since, first.reason
    for j, t in enumerate(transitions):
        if t.state == UNHEALTHY and j not in explained and not during_own(*(t.state_since,) * 2):
            unexplained.append(t)
    return unexplained


def measure_coordinator_faults(
    faults: Sequence[FaultRecord], records: Sequence[RequestRecord]
) -> None:
    """Fill in each coordinator fault's streams in flight, the longest stall one of them saw
    across it (the wait from the injection to its first delta after it) and how many of them
    went on through another coordinator. Measured from the injection, not from the stream's
    last delta: a stream already stuck on a frozen agent is not charged to the coordinator. A
    stream that stayed on its coordinator and whose first delta after the injection came from
    a later attempt failed over between nodes across it (an agent fault, under way meanwhile):
    its wait is the agent fault's, not counted here."""
    for fault in faults:
        if not fault.on_coordinator:
            continue
        at = fault.injected_at
        stalls = []
        fault.in_flight = fault.moved = 0
        for r in records:
            if not r.started_at < at < r.ended_at:
                continue
            fault.in_flight += 1
            moved = r.resumed_by_client or bool(r.coordinator_switches)
            fault.moved += moved
            k = bisect.bisect_right(r.arrivals, at)
            if k == len(r.arrivals):
                continue
            before = r.arrival_attempts[k - 1] if k else 1
            if not moved and r.arrival_attempts[k] > before:
                continue  # a failover between nodes
            stalls.append(r.arrivals[k] - at)
        fault.stall_s = max(stalls) if stalls else None


def failure_cause(error: str) -> str:
    """The kind of fault behind an attempt failure, from the coordinator's error text."""
    if "injected failure" in error:
        return "fail_requests"
    if "engine stopped" in error or "is not serving" in error:
        return "dead"
    if "DEADLINE_EXCEEDED" in error:
        return "stop"  # the active check's deadline: a frozen process
    return "kill"  # the connection broke or was refused


def _log_events(logs: Sequence[Path], marker: str) -> Iterator[dict[str, Any]]:
    """The JSON events of the logs whose line contains ``marker``."""
    for log in logs:
        try:
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if marker not in line:
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    yield event


def failover_causes(*coordinator_logs: Path) -> dict[str, list[str]]:
    """request_id -> the fault kind of each failed attempt, from the coordinators' JSON logs."""
    causes: dict[str, list[str]] = collections.defaultdict(list)
    for event in _log_events(coordinator_logs, '"attempt failed'):
        causes[str(event.get("request_id", ""))].append(failure_cause(str(event.get("error", ""))))
    return causes


def client_resumes(*coordinator_logs: Path) -> set[str]:
    """The request_ids a coordinator continued from a client's resume point (the stream came
    from another coordinator), from the coordinators' JSON logs."""
    return {
        str(event.get("request_id", ""))
        for event in _log_events(coordinator_logs, '"resumed_from_client_tokens"')
    }


# -- the report -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _detection_path(reason: str) -> str:
    """The state reason of a detection, without its variable details."""
    for prefix in (
        "health watch stream broke",
        "health watch stream ended",
        "health watch: NOT_SERVING",
        "health check failed: DEADLINE_EXCEEDED",
        "health check failed: UNAVAILABLE",
        "health check failed",
        "circuit breaker open",
        "request failed",
        "health check: NOT_SERVING",
    ):
        if reason.startswith(prefix):
            return prefix
    return reason[:40]


@dataclass
class ChaosReport:
    seed: int
    requests: int
    concurrency: int
    nodes: int
    cfg: ChaosConfig
    records: list[RequestRecord] = field(repr=False)
    faults: list[FaultRecord] = field(repr=False)
    spurious: list[NodeView] = field(repr=False)
    duration_s: float
    log_dir: Path
    coordinator_stats: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    # -- counts ------------------------------------------------------------------------

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.records)

    @property
    def lost(self) -> int:
        return self.count("lost") + self.count("truncated")

    @property
    def duplicated(self) -> int:
        return self.count("duplicated")

    @property
    def reordered(self) -> int:
        return self.count("reordered")

    @property
    def corrupt(self) -> int:
        return self.count("corrupt")

    def faults_of(self, kind: str) -> list[FaultRecord]:
        return [f for f in self.faults if f.kind == kind]

    @property
    def coordinators(self) -> int:
        return self.cfg.coordinators

    def fault_counts(self) -> dict[str, int]:
        return {kind: len(self.faults_of(kind)) for kind in self.cfg.kinds}

    def detection(self, kind: str) -> tuple[float | None, float | None, int]:
        """(p50, max, undetected) of the detection times of one kind of agent fault. Each
        coordinator detects on its own: every (fault, coordinator) pair counts, but for a
        coordinator under a fault of its own meanwhile (``FaultRecord.blind``)."""
        faults = self.faults_of(kind)
        times = [max(0.0, at - f.injected_at) for f in faults for at, _ in f.detections.values()]
        undetected = sum(
            c not in f.detections and c not in f.blind and not f.cut_short
            for f in faults
            for c in range(self.coordinators)
        )
        if not times:
            return None, None, undetected
        return statistics.median(times), max(times), undetected

    def detection_paths(self, kind: str) -> dict[str, int]:
        return dict(
            collections.Counter(
                _detection_path(reason)
                for f in self.faults_of(kind)
                for _, reason in f.detections.values()
                if reason
            ).most_common()
        )

    def coordinator_figures(
        self, kind: str
    ) -> tuple[int, float | None, float | None, int, int, float | None, float | None]:
        """(faults, stall p50, stall max, streams in flight, of them moved to another
        coordinator, recovery p50, recovery max) of one kind of coordinator fault. A fault's
        stall is the longest wait of a stream in flight for its first delta after it."""
        faults = self.faults_of(kind)
        stalls = [f.stall_s for f in faults if f.stall_s is not None]
        r50, rmax = self.recovery(kind)
        return (
            len(faults),
            statistics.median(stalls) if stalls else None,
            max(stalls) if stalls else None,
            sum(f.in_flight for f in faults),
            sum(f.moved for f in faults),
            r50,
            rmax,
        )

    def recovery(self, kind: str) -> tuple[float | None, float | None]:
        times = [r for f in self.faults_of(kind) if (r := f.recovery_s) is not None]
        return (statistics.median(times), max(times)) if times else (None, None)

    def failed_over(self) -> list[RequestRecord]:
        return [r for r in self.records if r.failed_over and r.outcome == "ok"]

    def _added(self) -> list[tuple[RequestRecord, float]]:
        """Each failed-over request with its latency minus the median latency of undisturbed
        requests with as many output tokens (buckets of 10; the nearest bucket if empty)."""
        buckets: dict[int, list[float]] = collections.defaultdict(list)
        for r in self.records:
            if r.outcome == "ok" and not r.failed_over:
                buckets[r.expected_tokens // 10].append(r.latency_s)
        if not buckets:
            return []
        medians = {b: statistics.median(v) for b, v in buckets.items()}
        added = []
        for r in self.failed_over():
            bucket = r.expected_tokens // 10
            nearest = min(medians, key=lambda b: (abs(b - bucket), b))
            added.append((r, r.latency_s - medians[nearest]))
        return added

    def added_latency(self) -> list[float]:
        return [a for _, a in self._added()]

    def added_latency_by_cause(self) -> dict[str, list[float]]:
        """Added latency grouped by the kind of fault that failed the request's first attempt
        (from the coordinator's log; "unknown" where the log says nothing)."""
        out: dict[str, list[float]] = {}
        for r, added in self._added():
            out.setdefault(r.causes[0] if r.causes else "unknown", []).append(added)
        return {k: out[k] for k in (*KINDS, "unknown") if k in out}

    def failures(self) -> list[str]:
        """Everything that makes the run fail, one line each (empty: it passed)."""
        out = list(self.problems)
        for outcome in ("lost", "truncated", "duplicated", "reordered", "corrupt"):
            bad = [r for r in self.records if r.outcome == outcome]
            if bad:
                examples = "; ".join(f"#{r.spec.index} {r.detail}" for r in bad[:3])
                out.append(f"{len(bad)} request(s) {outcome}: {examples}")
        missing = [k for k, n in self.fault_counts().items() if n == 0]
        if missing:
            out.append(f"no fault of kind(s) {', '.join(missing)} happened")
        stuck = [f for f in self.faults if f.recovery_timed_out]
        if stuck:
            out.append(
                f"{len(stuck)} node(s) not healthy {self.cfg.recovery_timeout_s:g}s after repair: "
                + ", ".join(f"{f.node_id} ({f.kind})" for f in stuck)
            )
        out += [f"{f.node_id} ({f.kind}): {f.error}" for f in self.faults if f.error]
        return out

    # -- rendering ---------------------------------------------------------------------

    def summary(self) -> str:
        lines = [
            f"chaos run: seed {self.seed}, {self.requests} requests at concurrency "
            f"{self.concurrency}, {self.nodes} nodes"
            + (f", {self.coordinators} coordinators" if self.coordinators > 1 else "")
            + f", {self.duration_s:.1f} s (logs: {self.log_dir})",
            "requests: "
            + ", ".join(f"{o} {self.count(o)}" for o in OUTCOMES)
            + f"; failed over {len(self.failed_over())}, resumed mid-stream "
            + f"{sum(r.token_attempts > 1 for r in self.records)}",
            f"lost {self.lost}, duplicated {self.duplicated}, reordered {self.reordered}, "
            f"corrupt {self.corrupt}",
            "faults: "
            + ", ".join(f"{k} {n}" for k, n in self.fault_counts().items())
            + f" ({sum(f.cut_short for f in self.faults)} cut short by the end of the run)",
        ]
        for kind in KINDS:
            p50, worst, undetected = self.detection(kind)
            r50, rmax = self.recovery(kind)
            paths = ", ".join(f"{p} x{n}" for p, n in self.detection_paths(kind).items())
            lines.append(
                f"  {kind:<13} detection p50 {_ms(p50)}, max {_ms(worst)}, undetected "
                f"{undetected}; healthy again after repair p50 {_ms(r50)}, max {_ms(rmax)}; "
                f"by: {paths or '-'}"
            )
        for kind in self.cfg.kinds:
            if kind not in COORDINATOR_KINDS:
                continue
            n, s50, smax, in_flight, moved, r50, rmax = self.coordinator_figures(kind)
            lines.append(
                f"  {kind:<19} {n}x: stall of a stream in flight p50 {_ms(s50)}, max "
                f"{_ms(smax)} ({in_flight} in flight, {moved} moved to another coordinator); "
                f"all agents healthy again after the repair p50 {_ms(r50)}, max {_ms(rmax)}"
            )
        added = self.added_latency()
        stalls = [r.stall_s for r in self.failed_over() if r.stall_s is not None]
        if added:
            lines.append(
                f"added latency of failed-over requests: p50 {_ms(percentile(added, 50))}, "
                f"p90 {_ms(percentile(added, 90))}, max {_ms(max(added))}; stall before the "
                f"new attempt's first delta p50 {_ms(percentile(stalls, 50) if stalls else None)}"
                f", max {_ms(max(stalls) if stalls else None)}"
            )
            for cause, values in self.added_latency_by_cause().items():
                lines.append(
                    f"  first failure by {cause:<13} {len(values):>5} requests: added p50 "
                    f"{_ms(percentile(values, 50))}, p90 {_ms(percentile(values, 90))}, "
                    f"max {_ms(max(values))}"
                )
        lines.append(
            f"ejections without a fault: {len(self.spurious)}"
            + (
                " (" + "; ".join(f"{t.node_id}: {t.reason[:60]}" for t in self.spurious[:3]) + ")"
                if self.spurious
                else ""
            )
        )
        if self.coordinator_stats:
            lines.append(
                (
                    "coordinator: "
                    if self.coordinators == 1
                    else "coordinators (summed, each since its last start): "
                )
                + ", ".join(f"{k} {v}" for k, v in self.coordinator_stats.items())
            )
        failures = self.failures()
        lines.append("result: " + ("PASS" if not failures else "FAIL"))
        lines.extend(f"  - {f}" for f in failures)
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything needed for a post-mortem: the faults, the requests that were not ok,
        the ejections no fault explains, and where the logs are."""
        return {
            "seed": self.seed,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "nodes": self.nodes,
            "coordinators": self.coordinators,
            "duration_s": self.duration_s,
            "log_dir": str(self.log_dir),
            "failures": self.failures(),
            "faults": [
                {**dataclasses.asdict(f), "detection_s": f.detection_s, "recovery_s": f.recovery_s}
                for f in self.faults
            ],
            "bad_requests": [
                {
                    **{
                        k: v
                        for k, v in dataclasses.asdict(r).items()
                        if k not in ("arrivals", "arrival_attempts")
                    },
                    "spec": dataclasses.asdict(r.spec),
                }
                for r in self.records
                if r.outcome != "ok"
            ],
            "spurious_ejections": [dataclasses.asdict(t) for t in self.spurious],
            "coordinator": self.coordinator_stats,
        }

    def markdown(self, command: str = "") -> str:
        cfg = self.cfg
        failed_over = self.failed_over()
        added = self.added_latency()
        stalls = [r.stall_s for r in failed_over if r.stall_s is not None]
        resumed = sum(r.token_attempts > 1 for r in self.records)
        out = [
            f"### Run: seed {self.seed}, {self.requests} requests",
            "",
            f"Measured {dt.date.today().isoformat()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"{self.duration_s:.0f} s wall clock.",
            "",
        ]
        if command:
            out += ["```", command, "```", ""]
        out += [
            f"Cluster: {self.nodes} simulated agents (TTFT {cfg.sim_ttft_ms:g} ms, ITL "
            f"{cfg.sim_itl_ms:g} ms), `{cfg.strategy}`, health check every "
            f"{cfg.health_check_interval:g} s with a {cfg.health_check_timeout:g} s deadline, "
            f"max_retries {cfg.max_retries}, breaker {cfg.breaker_failures} failures / "
            f"{cfg.breaker_base_ejection:g} s x n (max {cfg.breaker_max_ejection:g} s). Load: "
            f"concurrency {self.concurrency}, max_tokens {cfg.min_tokens}-{cfg.max_tokens}.",
            "",
            "| requests | ok | lost | duplicated | reordered | corrupt | failed over | "
            "resumed mid-stream | errors with no healthy node |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {self.requests} | {self.count('ok')} | {self.lost} | {self.duplicated} | "
            f"{self.reordered} | {self.corrupt} | {len(failed_over)} | {resumed} | "
            f"{self.count('excused')} |",
            "",
            "| fault | injected | detection p50 | detection max | undetected | detected by | "
            "healthy again after repair, p50 / max |",
            "|---|---:|---:|---:|---:|---|---:|",
        ]
        for kind in KINDS:
            p50, worst, undetected = self.detection(kind)
            r50, rmax = self.recovery(kind)
            paths = ", ".join(f"{p} ({n})" for p, n in self.detection_paths(kind).items())
            out.append(
                f"| {KIND_TITLES[kind]} | {len(self.faults_of(kind))} | {_ms(p50)} | "
                f"{_ms(worst)} | {undetected} | {paths or '-'} | {_ms(r50)} / {_ms(rmax)} |"
            )
        out.append("")
        if self.coordinators > 1:
            out += [
                f"{self.coordinators} coordinators, the SDK holding every address (keepalive "
                f"{cfg.keepalive_time_s:g} s + {cfg.keepalive_timeout_s:g} s, the agents' "
                "too); agent faults' detection counts each coordinator's own, but for one "
                "under a fault of its own meanwhile.",
                "",
                "| coordinator fault | injected | streams in flight | moved to the other | "
                "stall p50 | stall max | all agents healthy again after repair, p50 / max |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for kind in COORDINATOR_KINDS:
                n, s50, smax, in_flight, moved, r50, rmax = self.coordinator_figures(kind)
                out.append(
                    f"| {KIND_TITLES[kind]} | {n} | {in_flight} | {moved} | {_ms(s50)} | "
                    f"{_ms(smax)} | {_ms(r50)} / {_ms(rmax)} |"
                )
            out.append("")
        if added:
            out.append(
                f"Added latency of the {len(failed_over)} failed-over requests (latency minus "
                f"the median latency of undisturbed requests of the same output length): p50 "
                f"{_ms(percentile(added, 50))}, p90 {_ms(percentile(added, 90))}, p99 "
                f"{_ms(percentile(added, 99))}, max {_ms(max(added))}. Stall (longest wait "
                f"for the first delta of a new attempt): p50 "
                f"{_ms(percentile(stalls, 50) if stalls else None)}, max "
                f"{_ms(max(stalls) if stalls else None)}."
            )
            out += [
                "",
                "| first attempt failed by | requests | added p50 | added p90 | added max |",
                "|---|---:|---:|---:|---:|",
            ]
            for cause, values in self.added_latency_by_cause().items():
                out.append(
                    f"| {KIND_TITLES.get(cause, cause)} | {len(values)} | "
                    f"{_ms(percentile(values, 50))} | {_ms(percentile(values, 90))} | "
                    f"{_ms(max(values))} |"
                )
            out.append("")
        out.append(
            f"Faults cut short by the end of the run (not counted as undetected): "
            f"{sum(f.cut_short for f in self.faults)}. "
            f"Ejections of a node under no fault: {len(self.spurious)}. Coordinator counters"
            + (": " if self.coordinators == 1 else " (summed, each since its last start): ")
            + ", ".join(f"{k} {v}" for k, v in self.coordinator_stats.items())
            + "."
        )
        return "\n".join(out) + "\n"


# -- the run --------------------------------------------------------------------------------


async def _wait_all_healthy(cluster: LocalCluster, client: CoordinatorClient, n: int) -> None:
    deadline = time.monotonic() + 60.0
    while True:
        cluster.check_alive()
        stats = await asyncio.to_thread(client.stats)
        if len(stats.healthy_nodes) >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(stats.healthy_nodes)}/{n} nodes healthy after 60 s")
        await asyncio.sleep(0.05)


async def _one_request(
    orch: DistributedOrchestrator,
    spec: RequestSpec,
    excusable: Callable[[float, float], bool],
    cfg: ChaosConfig,
) -> RequestRecord:
    """One streamed request, checked; ``excusable(started, ended)``: whether an error that
    ended it at ``ended`` (wall clock) is excused (no healthy node in the window before it)."""
    record = RequestRecord(spec)
    expected = spec.expected()
    record.expected_tokens = len(expected.token_ids)
    token_ids: list[int] = []
    texts: list[str] = []
    finish_reason: str | None = None
    attempt_order_ok = True
    finals = 0  # deltas carrying a finish_reason: exactly one, the last
    after_final = 0  # deltas received after the first final one
    token_attempts: set[int] = set()
    stall = 0.0
    # The attempt number in the current coordinator's part of the stream: a stream that goes on
    # through another coordinator starts again from attempt 1 there.
    attempt = 0
    record.started_at = time.time()
    start = last = time.monotonic()
    prompt: str | list[int] = spec.prompt if isinstance(spec.prompt, str) else list(spec.prompt)
    try:
        async for delta in orch.stream(
            prompt,
            timeout=cfg.request_timeout_s,
            max_tokens=spec.max_tokens,
            seed=spec.seed,
            stop=list(spec.stop) or None,
        ):
            now = time.monotonic()
            record.arrivals.append(time.time())
            record.arrival_attempts.append(delta.attempt)
            if delta.attempt < attempt:
                if cfg.coordinators > 1:  # another coordinator's part of the stream
                    record.coordinator_switches.append(record.arrivals[-1])
                    attempt = delta.attempt
                else:
                    attempt_order_ok = False
            elif delta.attempt > max(attempt, 1):
                stall = max(stall, now - last)
            attempt = max(attempt, delta.attempt)
            record.attempts = max(record.attempts, delta.attempt)
            last = now
            if not record.nodes or record.nodes[-1] != delta.node_id:
                record.nodes.append(delta.node_id)
            if delta.token_ids:
                token_attempts.add(delta.attempt)
            token_ids.extend(delta.token_ids)
            texts.append(delta.text)
            record.request_id = record.request_id or delta.request_id
            if finals:
                after_final += 1
            if delta.finish_reason:
                finals += 1
                finish_reason = delta.finish_reason
    except GenerationError as exc:
        record.ended_at = time.time()
        record.latency_s = time.monotonic() - start
        record.detail = f"{exc} after {len(token_ids)} tokens (request_id {record.request_id})"
        clear = bool(exc.message) and exc.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        excused = clear and excusable(record.started_at, record.ended_at)
        record.outcome = "excused" if excused else "lost"
        return record
    except Exception as exc:  # not a clear error: counts as lost
        record.ended_at = time.time()
        record.latency_s = time.monotonic() - start
        record.outcome, record.detail = "lost", f"unclear error {type(exc).__name__}: {exc}"
        return record
    record.ended_at = time.time()
    record.latency_s = time.monotonic() - start
    record.token_attempts = len(token_attempts)
    record.stall_s = stall if record.failed_over else None
    if not attempt_order_ok:
        record.outcome, record.detail = "reordered", "attempt numbers went backwards"
    else:
        record.outcome, record.detail = classify_output(
            expected, token_ids, "".join(texts), finish_reason
        )
    if record.outcome == "ok" and (finals != 1 or after_final):
        record.outcome = "duplicated" if finals > 1 else "truncated"
        record.detail = f"{finals} final message(s), {after_final} message(s) after the first"
    if record.outcome != "ok":
        record.detail += (
            f" (request_id {record.request_id}, attempts {record.attempts}, "
            f"nodes {'>'.join(record.nodes)})"
        )
    return record


async def _run_load(
    orch: DistributedOrchestrator,
    specs: Iterator[RequestSpec],
    minimum: int,
    concurrency: int,
    excusable: Callable[[float, float], bool],
    cfg: ChaosConfig,
    keep_going: Callable[[], bool],
    progress: Callable[[str], None] | None,
) -> list[RequestRecord]:
    """Run at least ``minimum`` requests, ``concurrency`` at a time, and go on issuing more
    while ``keep_going()`` says so."""
    records: list[RequestRecord] = []
    issued = 0
    step = max(1, minimum // 10)

    async def worker() -> None:
        nonlocal issued
        while issued < minimum or keep_going():
            issued += 1
            spec = next(specs)
            records.append(await _one_request(orch, spec, excusable, cfg))
            if progress is not None and len(records) % step == 0:
                bad = sum(r.outcome not in ("ok", "excused") for r in records)
                progress(f"{len(records)} requests done ({minimum} at least), {bad} bad")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    records.sort(key=lambda r: r.spec.index)
    return records


async def _final_stats(
    client: CoordinatorClient, patience_s: float
) -> coordinator_pb2.ClusterStats:
    """The coordinator's stats; a coordinator restarted just before the end of the run may not
    be dialed again yet (the channel's reconnect backoff, up to 1 s): asked again for up to
    ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return await asyncio.to_thread(client.stats)
        except CoordinatorUnreachable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def run_chaos_async(
    seed: int,
    requests: int,
    concurrency: int,
    nodes: int = 4,
    log_dir: Path | None = None,
    cfg: ChaosConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChaosReport:
    """The chaos run, in the running event loop (see the module docstring)."""
    if nodes < 3:
        raise ValueError("a chaos run needs at least 3 nodes (one fault, two healthy)")
    cfg = cfg or ChaosConfig()
    if cfg.coordinators < 1:
        raise ValueError(f"a chaos run needs a coordinator, got coordinators={cfg.coordinators}")
    if cfg.coordinators > 1 and cfg.workers > 1:
        # The faults go to each coordinator's first process: a control process killed or
        # frozen leaves its workers on the port, which is another experiment.
        raise ValueError("coordinator faults need one-process coordinators (workers=1)")
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"omni-chaos-{seed}-"))
    cluster = LocalCluster(
        num_nodes=nodes,
        strategy=cfg.strategy,
        health_check_interval=cfg.health_check_interval,
        max_retries=cfg.max_retries,
        coordinator_args=cfg.coordinator_args(),
        agent_args=cfg.agent_args(),
        log_dir=log_dir,
        num_coordinators=cfg.coordinators,
    )
    clients: list[CoordinatorClient] = []
    monitors: list[ClusterMonitor] = []
    driver: FaultDriver | None = None
    problems: list[str] = []
    try:
        await asyncio.to_thread(cluster.start)
        addresses = list(cluster.coordinator_addresses)
        clients = [CoordinatorClient(address) for address in addresses]
        for client in clients:
            await _wait_all_healthy(cluster, client, nodes)
        # One monitor per coordinator: each coordinator has its own registry, so each one's
        # detection of an agent fault is measured in its own view (see attribute_detections).
        monitors = [
            ClusterMonitor(address, cfg.monitor_interval_s, index)
            for index, address in enumerate(addresses)
        ]
        for monitor in monitors:
            monitor.start()
        driver = fault_driver = FaultDriver(cluster, monitors, seed, cfg)
        if cfg.coordinators == 1:
            orch = DistributedOrchestrator(coordinator=addresses[0], timeout=cfg.request_timeout_s)
        else:
            orch = DistributedOrchestrator(
                coordinator=addresses,
                timeout=cfg.request_timeout_s,
                keepalive_time=cfg.keepalive_time_s,
                keepalive_timeout=cfg.keepalive_timeout_s,
            )

        def excusable(started: float, ended: float) -> bool:
            # A coordinator fault must lose nothing: no excuse for a request it overlapped.
            if fault_driver.coordinator_fault_between(started, ended):
                return False
            window = (ended - cfg.no_healthy_window_s, ended + 0.1)
            return all(m.none_healthy_between(*window) for m in monitors)

        started = time.monotonic()
        driver_task = asyncio.create_task(driver.run(), name="fault-driver")
        try:
            give_up = time.monotonic() + cfg.first_round_limit_s
            records = await _run_load(
                orch,
                iter_specs(seed, cfg),
                requests,
                concurrency,
                excusable,
                cfg,
                lambda: not fault_driver.first_round_over() and time.monotonic() < give_up,
                progress,
            )
        finally:
            await driver.stop()
            driver_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver_task
            await orch.aclose()
        duration = time.monotonic() - started
        killed = driver.killed_for_good()
        # Summed over the coordinators (a restarted one counts since its restart).
        coordinator_stats: dict[str, int] = {}
        for index, child in enumerate(cluster.coordinators):
            if not child.alive:
                if child.name not in killed:
                    problems.append(
                        "the coordinator exited during the run"
                        if cfg.coordinators == 1
                        else f"{child.name} exited on its own (code {child.process.returncode})"
                    )
                continue
            stats = await _final_stats(clients[index], 10.0 if cfg.coordinators > 1 else 0.0)
            counters = {
                "requests_total": stats.requests_total,
                "requests_succeeded": stats.requests_succeeded,
                "requests_failed": stats.requests_failed,
                "retries_total": stats.retries_total,
            }
            if cfg.coordinators > 1:
                counters["resumes_total"] = stats.resumes_total
            for key, value in counters.items():
                coordinator_stats[key] = coordinator_stats.get(key, 0) + value
        for agent in cluster.agents:
            if not agent.alive and agent.name not in killed:
                problems.append(
                    f"{agent.name} exited on its own (code {agent.process.returncode}): "
                    + agent.log_tail(5)
                )
        for monitor in monitors:
            monitor.stop()
        end = time.time()
        spurious = [
            t
            for monitor in monitors
            for t in attribute_detections(driver.faults, monitor.transitions, end, monitor.index)
        ]
        logs = [log_dir / f"{coordinator_name(i)}.log" for i in range(cfg.coordinators)]
        causes = failover_causes(*logs)
        resumed = client_resumes(*logs) if cfg.coordinators > 1 else set()
        for record in records:
            record.causes = causes.get(record.request_id, [])
            record.resumed_by_client = bool(record.request_id) and record.request_id in resumed
        measure_coordinator_faults(driver.faults, records)
        # A stream goes on through another coordinator only when its own went away.
        strays = [
            r
            for r in records
            if (r.resumed_by_client or r.coordinator_switches)
            and not driver.coordinator_fault_between(r.started_at, r.ended_at)
        ]
        if strays:
            problems.append(
                f"{len(strays)} stream(s) went on through another coordinator with no "
                "coordinator fault under way: "
                + "; ".join(f"#{r.spec.index} (request_id {r.request_id})" for r in strays[:3])
            )
        for monitor in monitors:
            own = [
                f.window(end)
                for f in driver.faults
                if f.on_coordinator and f.index == monitor.index
            ]
            errors = [t for t in monitor.error_times if not any(a <= t <= b for a, b in own)]
            if errors and cfg.coordinators == 1:
                problems.append(f"the monitor failed to reach the coordinator {len(errors)}x")
            elif errors:
                problems.append(
                    f"the monitor failed to reach {coordinator_name(monitor.index)} "
                    f"{len(errors)}x outside its own faults"
                )
        return ChaosReport(
            seed=seed,
            requests=len(records),
            concurrency=concurrency,
            nodes=nodes,
            cfg=cfg,
            records=records,
            faults=driver.faults,
            spurious=spurious,
            duration_s=duration,
            log_dir=log_dir,
            coordinator_stats=coordinator_stats,
            problems=problems,
        )
    finally:
        if driver is not None:
            driver.continue_all()
        for monitor in monitors:
            monitor.stop()
        for client in clients:
            client.close()
        await asyncio.to_thread(cluster.stop)


def run_chaos(
    seed: int,
    requests: int,
    concurrency: int,
    nodes: int = 4,
    log_dir: Path | None = None,
    cfg: ChaosConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChaosReport:
    """Run a chaos test in a new event loop and return its report."""
    return asyncio.run(run_chaos_async(seed, requests, concurrency, nodes, log_dir, cfg, progress))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.chaos.harness",
        description="Run a cluster under load while a seeded fault driver breaks its nodes.",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--strategy", default=ChaosConfig.strategy, help="load balancing strategy")
    p.add_argument(
        "--workers", type=int, default=ChaosConfig.workers, help="the coordinator's --workers"
    )
    p.add_argument(
        "--coordinators",
        type=int,
        default=ChaosConfig.coordinators,
        help="coordinators side by side; with 2 or more, coordinators are killed, frozen and "
        "restarted too (one at a time)",
    )
    p.add_argument("--log-dir", type=Path, help="per-process logs (default: a temporary dir)")
    p.add_argument("--markdown", type=Path, help="also write the report as a markdown section")
    p.add_argument("--json", type=Path, help="also write faults and failed requests as JSON")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    if args.coordinators < 1:
        p.error("--coordinators must be >= 1")
    if args.coordinators > 1 and args.workers > 1:
        p.error("--coordinators above 1 needs --workers 1 (coordinator faults hit one process)")

    def progress(message: str) -> None:
        print(f"[chaos] {message}", file=sys.stderr, flush=True)

    cfg = ChaosConfig(strategy=args.strategy, workers=args.workers, coordinators=args.coordinators)
    report = run_chaos(
        args.seed, args.requests, args.concurrency, args.nodes, args.log_dir, cfg, progress
    )
    print(report.summary())
    if args.markdown is not None:
        command = (
            f"python -m tests.chaos.harness --seed {args.seed} --requests {args.requests} "
            f"--concurrency {args.concurrency} --nodes {args.nodes}"
            + (f" --strategy {args.strategy}" if args.strategy != ChaosConfig.strategy else "")
            + (f" --workers {args.workers}" if args.workers != ChaosConfig.workers else "")
            + (
                f" --coordinators {args.coordinators}"
                if args.coordinators != ChaosConfig.coordinators
                else ""
            )
        )
        args.markdown.write_text(report.markdown(command))
        print(f"markdown written to {args.markdown}")
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=1))
        print(f"JSON written to {args.json}")
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
