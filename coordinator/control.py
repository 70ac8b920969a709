"""The control process of ``omni-coordinator --workers N`` (N > 1).

It owns what there is one of: the registry (``Registry.Join``/``Leave``), the health monitor,
the circuit breaker, the stats and the metrics endpoint. N worker processes
(``coordinator/worker.py``) serve the public port together (SO_REUSEPORT) and dispatch
``Generate`` calls from replicas of the registry. Between them, on a unix socket in a private
directory: the internal ``ControlPlane`` service (``protos/omni/v1/control.proto``), plus the
``Registry`` service and the ``Coordinator`` service's ``GetStats``, ``ListNodes`` and
``DrainNode``, which the workers forward unchanged.

Pushes, not polls: every change of a node (``Registry.on_changed``) sends each worker a full
snapshot of the nodes with a new version on its ``Attach`` stream (load refreshes at most once
per health-check interval), and a node found unreachable (``Registry.on_lost``) sends a
``NodeLost`` event at once, so that every worker cancels its streams on it. ``DrainNode``
answers only after every worker has acknowledged the snapshot that carries the drain. Stats
and metrics are pulled from every worker on demand (``StatsQuery``) and summed; the last
figures of a worker that died are kept, so totals do not go back.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator import assembly
from coordinator.dispatch import DispatchCounters
from coordinator.http.server import http_address
from coordinator.outliers import LATENCY_OUTLIER
from coordinator.ports import reserve_port
from coordinator.registry import Node, Registry, state_name
from coordinator.replica import node_counters
from coordinator.service import RegistryService
from coordinator.stats import NodeCounters, cluster_stats, node_info, sum_counters
from coordinator.stats import sum_node_counters as sum_nodes
from omni_rpc import config, security, servers
from omni_rpc.backoff import Backoff
from omni_rpc.logging import get_logger
from omni_rpc.metrics import (
    CoordinatorMetrics,
    cache_counts,
    cache_families,
    merge_exposition,
    node_families,
    serve_metrics,
)
from omni_rpc.v1 import (
    control_pb2,
    control_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    registry_pb2_grpc,
)

log = get_logger("coordinator.control")

SERVICES = [config.COORDINATOR_SERVICE, config.REGISTRY_SERVICE]


@dataclass(eq=False)
class WorkerLink:
    """One attached worker: its outbox and what it has acknowledged."""

    index: int
    pid: int
    outbox: asyncio.Queue[control_pb2.ControlMessage | None] = field(default_factory=asyncio.Queue)
    acked: int = 0
    # The last of the worker's NodeReports processed, and the last one a snapshot told it.
    reports_seen: int = 0
    reports_told: int = 0
    last_stats: control_pb2.WorkerStats | None = None
    answers: dict[int, asyncio.Future[control_pb2.WorkerStats]] = field(default_factory=dict)
    acked_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def ack(self, version: int) -> None:
        self.acked = max(self.acked, version)
        self.acked_changed.set()
        self.acked_changed = asyncio.Event()

    def send(self, message: control_pb2.ControlMessage | None) -> None:
        """Queue ``message`` for the worker (None: end the stream)."""
        self.outbox.put_nowait(message)


class ControlHub(control_pb2_grpc.ControlPlaneServicer):
    """The control process's side of every worker's Attach stream."""

    def __init__(self, registry: Registry, load_interval_s: float) -> None:
        self.registry = registry
        self.load_interval_s = load_interval_s
        self.version = 0
        self.links: dict[int, WorkerLink] = {}
        # Figures of workers that are gone (their last answer), so totals never go back.
        self.retired: list[control_pb2.WorkerStats] = []
        self.attached_changed = asyncio.Event()
        self._queries = itertools.count(1)
        self._push_pending = False
        self._pushed: bytes = b""
        registry.on_changed.append(lambda node: self.schedule_push())
        registry.on_lost.append(self.node_lost)

    # -- pushes --------------------------------------------------------------------------------

    def _nodes(self) -> list[control_pb2.NodeSnapshot]:
        nodes = []
        for node in sorted(self.registry.nodes.values(), key=lambda n: n.node_id):
            pushed = control_pb2.NodeSnapshot(
                info=node.info,
                verdict=node.verdict,  # type: ignore[arg-type]
                drained=node.drained,
                self_draining=node.self_draining,
                state_reason=node.state_reason,
                state_since=node.state_since,
                joined_at=node.joined_at,
            )
            if node.load is not None:
                pushed.load.CopyFrom(node.load)
            nodes.append(pushed)
        return nodes

    def schedule_push(self) -> None:
        """Push soon (in this loop turn's callbacks): several changes at once, one push."""
        if not self._push_pending:
            self._push_pending = True
            asyncio.get_running_loop().call_soon(self.push_now)

    def push_now(self, links: Iterable[WorkerLink] | None = None) -> int:
        """Send every worker (or ``links``) the current snapshot; return its version."""
        self._push_pending = False if links is None else self._push_pending
        self.version += 1
        nodes = self._nodes()
        if links is None:
            self._pushed = b"".join(n.SerializeToString(deterministic=True) for n in nodes)
        for link in list(self.links.values()) if links is None else links:
            link.reports_told = link.reports_seen
            link.send(
                control_pb2.ControlMessage(
                    snapshot=control_pb2.ClusterSnapshot(
                        version=self.version, nodes=nodes, reports_seen=link.reports_seen
                    )
                )
            )
        return self.version

    async def push_loads(self) -> None:
        """Loads change with every health check: pushed at most once per interval."""
        while True:
            await asyncio.sleep(self.load_interval_s)
            current = b"".join(n.SerializeToString(deterministic=True) for n in self._nodes())
            if current != self._pushed:
                self.push_now()

    def node_lost(self, node: Node, reason: str) -> None:
        event = control_pb2.ControlMessage(
            lost=control_pb2.NodeLost(node_id=node.node_id, address=node.address, reason=reason)
        )
        for link in list(self.links.values()):
            link.send(event)

    async def wait_acked(self, version: int, timeout_s: float) -> list[int]:
        """Wait until every attached worker has applied ``version``; return the indices of
        those that had not when ``timeout_s`` ran out."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            behind = [link for link in self.links.values() if link.acked < version]
            left = deadline - asyncio.get_running_loop().time()
            if not behind or left <= 0:
                return sorted(link.index for link in behind)
            waits = [asyncio.ensure_future(link.acked_changed.wait()) for link in behind]
            waits.append(asyncio.ensure_future(self.attached_changed.wait()))
            _, pending = await asyncio.wait(waits, timeout=left, return_when="FIRST_COMPLETED")
            for wait in pending:
                wait.cancel()

    # -- stats ---------------------------------------------------------------------------------

    async def pull(self, metrics: bool = False) -> list[control_pb2.WorkerStats]:
        """Every attached worker's counters now (a worker that does not answer in time: its
        last answer), followed by those of workers that are gone."""
        query_id = next(self._queries)
        loop = asyncio.get_running_loop()
        asked: dict[WorkerLink, asyncio.Future[control_pb2.WorkerStats]] = {}
        for link in list(self.links.values()):
            future: asyncio.Future[control_pb2.WorkerStats] = loop.create_future()
            link.answers[query_id] = future
            asked[link] = future
            link.send(
                control_pb2.ControlMessage(
                    stats_query=control_pb2.StatsQuery(query_id=query_id, metrics=metrics)
                )
            )
        if asked:
            await asyncio.wait(asked.values(), timeout=config.WORKER_STATS_TIMEOUT_S)
        answers = []
        for link, future in asked.items():
            link.answers.pop(query_id, None)
            if future.done() and not future.cancelled():
                link.last_stats = future.result()
                answers.append(link.last_stats)
            elif link.last_stats is not None:
                log.warning("worker did not answer in time: its last figures", worker=link.index)
                answers.append(link.last_stats)
        return answers + self.retired

    # -- the stream ----------------------------------------------------------------------------

    async def Attach(
        self,
        request_iterator: AsyncIterator[control_pb2.WorkerMessage],
        context: grpc.aio.ServicerContext[control_pb2.WorkerMessage, control_pb2.ControlMessage],
    ) -> AsyncIterator[control_pb2.ControlMessage]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hello expected first")
            return
        link = WorkerLink(first.hello.index, first.hello.pid)
        old = self.links.get(link.index)
        if old is not None:
            old.send(None)
        self.links[link.index] = link
        self._attached_changed()
        log.info("worker attached", worker=link.index, pid=link.pid)
        reader = asyncio.create_task(self._read(link, request_iterator), name="attach-reader")
        self.push_now([link])
        try:
            while (message := await link.outbox.get()) is not None:
                yield message
            failed = reader.exception() if reader.done() and not reader.cancelled() else None
            if failed is not None:
                raise failed  # a message that did not parse: the call ends INVALID_ARGUMENT
        finally:
            reader.cancel()
            if self.links.get(link.index) is link:
                del self.links[link.index]
            if link.last_stats is not None:
                # Gone: what it served still counts, nothing of it is in flight any more.
                gone = control_pb2.WorkerStats()
                gone.CopyFrom(link.last_stats)
                gone.in_flight = 0
                for counters in gone.nodes:
                    counters.in_flight = 0
                gone.metrics_text = link.last_stats.metrics_text
                self.retired.append(gone)
            for future in link.answers.values():
                future.cancel()
            self._attached_changed()
            log.info("worker detached", worker=link.index, pid=link.pid)

    def _attached_changed(self) -> None:
        self.attached_changed.set()
        self.attached_changed = asyncio.Event()

    async def _read(
        self, link: WorkerLink, requests: AsyncIterator[control_pb2.WorkerMessage]
    ) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "ack":
                    first = link.acked == 0
                    link.ack(message.ack.version)
                    if first:
                        self._attached_changed()  # it serves now
                elif kind == "report":
                    self._report(link, message.report)
                elif kind == "stats":
                    future = link.answers.get(message.stats.query_id)
                    if future is not None and not future.done():
                        future.set_result(message.stats)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            link.send(None)

    def _report(self, link: WorkerLink, report: control_pb2.NodeReport) -> None:
        link.reports_seen = max(link.reports_seen, report.report_id)
        node = self.registry.nodes.get(report.node_id)
        if node is not None and node.address == report.address:
            if report.success:
                node.breaker.record_success()
            elif report.outlier:
                self.registry.eject(node, LATENCY_OUTLIER, report.error)
            else:
                self.registry.record_failure(node, report.error, report.unreachable)
        if not self._push_pending and link.reports_told < link.reports_seen:
            # Nothing else to push: tell this worker its report is in (it may hold the node).
            self.push_now([link])


class ClusterCollector(Collector):
    """The control process's /metrics: its own (health probes, ejections) and every worker's
    (requests, latency, tokens, retries) summed by name and labels, per-worker request totals
    (``omni_worker_requests_total{worker}``), and per-node gauges with in-flight summed."""

    def __init__(
        self,
        hub: ControlHub,
        registry: Registry,
        local: CollectorRegistry,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.hub = hub
        self.registry = registry
        self.local = local
        self.loop = loop

    def describe(self) -> list[Metric]:
        return []  # registering must not pull from the workers

    def collect(self) -> Iterable[Metric]:
        # Called on the metrics server's thread: the pull runs on the event loop.
        pull = asyncio.run_coroutine_threadsafe(self.hub.pull(metrics=True), self.loop)
        answers = pull.result(timeout=config.WORKER_STATS_TIMEOUT_S + 5.0)
        texts = [generate_latest(self.local).decode()] + [a.metrics_text for a in answers]
        yield from merge_exposition(texts)
        per_worker = CounterMetricFamily(
            "omni_worker_requests",
            "Generate calls each worker process of the coordinator has taken.",
            labels=["worker"],
        )
        totals: dict[str, int] = {}
        for answer in answers:
            totals[str(answer.index)] = totals.get(str(answer.index), 0) + answer.requests_total
        for worker, total in sorted(totals.items()):
            per_worker.add_metric([worker], total)
        yield per_worker
        sums = sum_nodes(node_counters(list(a.nodes)) for a in answers)
        nodes = list(self.registry.nodes.values())
        yield from node_families(
            (
                n.node_id,
                state_name(n.state),
                sums.get((n.node_id, n.address), NodeCounters()).in_flight,
            )
            for n in nodes
        )
        yield from cache_families(cache_counts(nodes))


def _counters(answer: control_pb2.WorkerStats) -> DispatchCounters:
    # WorkerStats carries DispatchCounters' fields under their names.
    return DispatchCounters(**{f.name: getattr(answer, f.name) for f in fields(DispatchCounters)})


class ControlCoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    """GetStats, ListNodes and DrainNode for the whole coordinator (forwarded by workers).
    Generate is the workers' alone: unimplemented here."""

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Generate is served by the workers")
        yield  # pragma: no cover

    def __init__(
        self,
        registry: Registry,
        hub: ControlHub,
        *,
        strategy: str,
        health_check_interval_s: float,
        max_retries: int,
    ) -> None:
        self.registry = registry
        self.hub = hub
        self.strategy = strategy
        self.health_check_interval_s = health_check_interval_s
        self.max_retries = max_retries
        self.coordinator_id = uuid.uuid4().hex[:12]
        self.started_at = time.time()

    async def _sums(self) -> tuple[DispatchCounters, dict[tuple[str, str], NodeCounters]]:
        answers = await self.hub.pull()
        return (
            sum_counters(_counters(a) for a in answers),
            sum_nodes(node_counters(list(a.nodes)) for a in answers),
        )

    async def GetStats(
        self, request: coordinator_pb2.GetStatsRequest, context: Any
    ) -> coordinator_pb2.ClusterStats:
        counters, nodes = await self._sums()
        return cluster_stats(
            self.registry,
            counters,
            strategy=self.strategy,
            health_check_interval_s=self.health_check_interval_s,
            max_retries=self.max_retries,
            coordinator_id=self.coordinator_id,
            started_at=self.started_at,
            node_counters=nodes,
        )

    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: Any
    ) -> coordinator_pb2.ListNodesResponse:
        _, sums = await self._sums()
        nodes = sorted(self.registry.nodes.values(), key=lambda n: n.node_id)
        return coordinator_pb2.ListNodesResponse(nodes=[node_info(n, sums) for n in nodes])

    async def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: Any
    ) -> coordinator_pb2.DrainNodeResponse:
        node = self.registry.nodes.get(request.node_id)
        if node is None:
            known = ", ".join(sorted(self.registry.nodes)) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no node {request.node_id!r} (known: {known})"
            )
        assert node is not None
        self.registry.set_drained(node, not request.undrain)
        # Pushed now (even when the state did not change) and acknowledged by every worker:
        # once this answers, no worker starts a new request on a drained node.
        version = self.hub.push_now()
        behind = await self.hub.wait_acked(version, config.WORKER_ACK_TIMEOUT_S)
        if behind:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"node {node.node_id} {'undrained' if request.undrain else 'drained'}, but "
                f"worker(s) {', '.join(map(str, behind))} did not acknowledge it within "
                f"{config.WORKER_ACK_TIMEOUT_S:g}s",
            )
        _, sums = await self._sums()
        info = node_info(node, sums)
        return coordinator_pb2.DrainNodeResponse(
            node=info, drained=node.drained and info.in_flight == 0
        )


class WorkerPool:
    """Starts the N worker processes, restarts one that dies, stops them all."""

    def __init__(
        self,
        count: int,
        args_file: Path,
        control_path: str,
        hub: ControlHub,
        grace_s: float,
        stop: asyncio.Event,
    ) -> None:
        self.count = count
        # Set by SIGTERM or SIGINT (which a terminal sends the workers too): no restarts then.
        self.stop_requested = stop
        self.args_file = args_file
        self.control_path = control_path
        self.hub = hub
        self.grace_s = grace_s
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.started = False
        # Set with a message when a worker exits before the pool has started.
        self.failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[None]] = []

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        # A worker shuts down when this process is gone (servers.stop_event_on_signals).
        env[config.PARENT_PID_ENV] = str(os.getpid())
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "coordinator.worker",
            str(self.args_file),
            str(index),
            self.control_path,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
        )
        self.processes[index] = process
        log.info("worker started", worker=index, pid=process.pid)
        return process

    async def start(self, timeout_s: float) -> None:
        """Start every worker; return once all serve: attached, first snapshot applied
        (OSError if one fails)."""
        for index in range(self.count):
            self._tasks.append(asyncio.create_task(self._supervise(index), name=f"worker-{index}"))
        deadline = asyncio.get_running_loop().time() + timeout_s
        while sum(link.acked > 0 for link in self.hub.links.values()) < self.count:
            if self.failed.done():
                raise OSError(self.failed.result())
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise OSError(f"workers did not attach within {timeout_s:g}s")
            if self.stop_requested.is_set():
                return
            changed: asyncio.Future[Any] = asyncio.ensure_future(self.hub.attached_changed.wait())
            stopped: asyncio.Future[Any] = asyncio.ensure_future(self.stop_requested.wait())
            failed: asyncio.Future[Any] = self.failed
            await asyncio.wait(
                {changed, stopped, failed}, timeout=left, return_when="FIRST_COMPLETED"
            )
            changed.cancel()
            stopped.cancel()
        self.started = True

    async def _supervise(self, index: int) -> None:
        backoff = Backoff(config.WORKER_RESTART_BACKOFF_BASE_S, config.WORKER_RESTART_BACKOFF_CAP_S)
        while not self.stopping:
            process = await self._spawn(index)
            began = time.monotonic()
            code = await process.wait()
            if self.stopping or self.stop_requested.is_set():
                return
            if not self.started:
                if not self.failed.done():
                    self.failed.set_result(
                        f"worker {index} exited with code {code} while starting (its log says why)"
                    )
                return
            if time.monotonic() - began > config.WORKER_RESTART_BACKOFF_CAP_S:
                backoff.reset()
            delay = backoff.next_delay()
            log.warning(
                "worker exited, restarting it",
                worker=index,
                pid=process.pid,
                code=code,
                restart_in_s=round(delay, 3),
            )
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """SIGTERM every worker (they drain within the grace), then wait; kill stragglers."""
        self.stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for index, process in self.processes.items():
            try:
                await asyncio.wait_for(process.wait(), self.grace_s + config.WORKER_STOP_MARGIN_S)
            except TimeoutError:
                log.warning("worker did not stop in time, killing it", worker=index)
                process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()


async def serve_control(args: argparse.Namespace, guard: security.ServerSecurity) -> int:
    stop = servers.stop_event_on_signals()
    host = args.listen.rsplit(":", 1)[0]
    # Free (not even shared) and concrete: the workers then share it among themselves only.
    port = reserve_port(args.listen)
    # The HTTP front door likewise: one concrete port, shared by the workers alone.
    http_port = reserve_port(args.http_listen) if args.http_listen else None
    local_metrics = CoordinatorMetrics()
    registry = assembly.monitored_registry(args, guard, local_metrics)
    hub = ControlHub(registry, args.health_check_interval)
    coordinator = ControlCoordinatorService(
        registry,
        hub,
        strategy=args.strategy,
        health_check_interval_s=args.health_check_interval,
        max_retries=args.max_retries,
    )
    private = Path(tempfile.mkdtemp(prefix="omni-coordinator-"))  # 0700: ours alone
    control_path = str(private / "control.sock")
    internal = grpc.aio.server(options=config.GRPC_MESSAGE_OPTIONS)
    control_pb2_grpc.add_ControlPlaneServicer_to_server(hub, internal)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, internal)
    registry_pb2_grpc.add_RegistryServicer_to_server(
        RegistryService(registry, coordinator.coordinator_id), internal
    )
    internal.add_insecure_port(f"unix:{control_path}")
    await internal.start()
    args_file = private / "args.pickle"
    worker_args = argparse.Namespace(**vars(args))
    worker_args.listen = f"{host}:{port}"
    if http_port is not None:
        worker_args.http_listen = f"{args.http_listen.rsplit(':', 1)[0]}:{http_port}"
    args_file.write_bytes(pickle.dumps(worker_args))
    loads = asyncio.create_task(hub.push_loads(), name="push-loads")
    pool = WorkerPool(args.workers, args_file, control_path, hub, args.shutdown_grace, stop)
    health = servers.ListingHealthServicer()
    health_only = None
    try:
        await pool.start(config.WORKER_START_TIMEOUT_S)
        if stop.is_set():
            log.info("stopped while starting")
            return 0
        health_only = await servers.start_health_only(health, args.health_listen)
        await servers.set_serving(health, SERVICES, True)
        served = CollectorRegistry()
        served.register(
            ClusterCollector(hub, registry, local_metrics.registry, asyncio.get_running_loop())
        )
        serve_metrics(served, args.metrics_port, host, args.metrics_port_file)
        servers.write_port_file(args.port_file, port)
        if http_port is not None:
            # Every worker serves HTTP once attached: it bound the port before attaching.
            servers.write_port_file(args.http_port_file, http_port)
        log.info(
            "coordinator serving",
            address=servers.advertised(args.listen, port),
            **http_address(args, http_port),
            workers=args.workers,
            strategy=args.strategy,
            health_check_interval_s=args.health_check_interval,
            max_retries=args.max_retries,
            coordinator_id=coordinator.coordinator_id,
            auth=args.auth,
            tls="mutual" if guard.tls.require_client_cert else ("on" if guard.tls.cert else "off"),
        )
        await stop.wait()
        log.info("shutting down", workers=args.workers, grace_s=args.shutdown_grace)
        await servers.set_serving(health, SERVICES, False)
        return 0
    finally:
        await pool.stop()
        loads.cancel()
        for link in list(hub.links.values()):
            link.send(None)
        await internal.stop(grace=None)
        if health_only is not None:
            await health_only.stop(grace=None)
        await registry.close()
        shutil.rmtree(private, ignore_errors=True)
        log.info("coordinator stopped")
