"""A data-plane worker of ``omni-coordinator --workers N``: serves the public port with others.

Started by the control process (``coordinator/control.py``) as
``python -m coordinator.worker ARGS_FILE INDEX CONTROL_SOCKET``. It binds the coordinator's
port with SO_REUSEPORT next to its sibling workers, serves ``Coordinator.Generate`` from a
replica of the control process's registry (``coordinator/replica.py``) kept current by the
pushes of its ``ControlPlane.Attach`` stream, and forwards what the control process owns to it
over the unix socket: ``Registry.Join`` and ``Leave`` (after the same identity checks as a
single-process coordinator), ``GetStats``, ``ListNodes`` and ``DrainNode``. It reports
``SERVING`` once the first snapshot is applied, and stops when its control process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import pickle
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import generate_latest

from coordinator import assembly
from coordinator.dispatch import Dispatcher
from coordinator.http.server import http_address, start_front_door
from coordinator.replica import ReplicaRegistry
from coordinator.service import CoordinatorService, RegistryService
from omni_rpc import config, security, servers
from omni_rpc.logging import configure_logging, get_logger
from omni_rpc.metrics import CoordinatorMetrics
from omni_rpc.v1 import (
    control_pb2,
    control_pb2_grpc,
    coordinator_pb2,
    coordinator_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

log = get_logger("coordinator.worker")

SERVICES = [config.COORDINATOR_SERVICE, config.REGISTRY_SERVICE]
# Forwarded calls to the control process: generous, it answers from memory.
FORWARD_TIMEOUT_S = config.WORKER_ACK_TIMEOUT_S + config.WORKER_STATS_TIMEOUT_S + 5.0

T = TypeVar("T")


class ControlLink:
    """The worker's end of ``ControlPlane.Attach``: applies pushes, answers questions, and
    carries the replica's node reports."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        index: int,
        replica: ReplicaRegistry,
        metrics: CoordinatorMetrics,
        dispatcher: Dispatcher,
    ) -> None:
        self.index = index
        self.replica = replica
        self.metrics = metrics
        self.dispatcher = dispatcher
        self.stub = control_pb2_grpc.ControlPlaneStub(channel)
        self._outbox: asyncio.Queue[control_pb2.WorkerMessage] = asyncio.Queue()
        self.attached = asyncio.Event()
        replica.report = self.send_report

    def send_report(self, report: control_pb2.NodeReport) -> None:
        self._outbox.put_nowait(control_pb2.WorkerMessage(report=report))

    async def _requests(self) -> AsyncIterator[control_pb2.WorkerMessage]:
        yield control_pb2.WorkerMessage(
            hello=control_pb2.WorkerHello(index=self.index, pid=os.getpid())
        )
        while True:
            yield await self._outbox.get()

    async def run(self) -> str:
        """Serve the stream until it ends; return why it ended."""
        call = self.stub.Attach(self._requests())
        try:
            async for message in call:
                self._handle(message)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} {exc.details() or ''}".strip()
        finally:
            call.cancel()
        return "stream ended"

    def _handle(self, message: control_pb2.ControlMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "snapshot":
            self.replica.apply(message.snapshot)
            self._outbox.put_nowait(
                control_pb2.WorkerMessage(
                    ack=control_pb2.SnapshotAck(version=message.snapshot.version)
                )
            )
            self.attached.set()
        elif kind == "lost":
            self.replica.lost(message.lost)
        elif kind == "stats_query":
            self._outbox.put_nowait(
                control_pb2.WorkerMessage(stats=self.stats(message.stats_query))
            )

    def stats(self, query: control_pb2.StatsQuery) -> control_pb2.WorkerStats:
        stats = control_pb2.WorkerStats(
            query_id=query.query_id,
            index=self.index,
            nodes=self.replica.counters(),
            **dataclasses.asdict(self.dispatcher.counters),
        )
        if query.metrics:
            stats.metrics_text = generate_latest(self.metrics.registry).decode()
        return stats


async def _forward(context: grpc.aio.ServicerContext[Any, Any], call: Awaitable[T]) -> T:
    """The control process's answer, or its status as this call's status."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            details = f"coordinator control process: {exc.details() or code.name}"
        else:
            details = exc.details() or ""
        await context.abort(code, details)
        raise  # not reached: abort raises


class ForwardingCoordinatorService(CoordinatorService):
    """Generate here; the registry's calls answered by the control process."""

    def __init__(self, control: grpc.aio.Channel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control = coordinator_pb2_grpc.CoordinatorStub(control)

    async def GetStats(
        self, request: coordinator_pb2.GetStatsRequest, context: Any
    ) -> coordinator_pb2.ClusterStats:
        return await _forward(context, self.control.GetStats(request, timeout=FORWARD_TIMEOUT_S))

    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: Any
    ) -> coordinator_pb2.ListNodesResponse:
        return await _forward(context, self.control.ListNodes(request, timeout=FORWARD_TIMEOUT_S))

    async def DrainNode(
        self, request: coordinator_pb2.DrainNodeRequest, context: Any
    ) -> coordinator_pb2.DrainNodeResponse:
        return await _forward(context, self.control.DrainNode(request, timeout=FORWARD_TIMEOUT_S))


class ForwardingRegistryService(RegistryService):
    """Join and Leave checked here (the caller's certificate is seen here only), decided by
    the control process."""

    def __init__(
        self, control: grpc.aio.Channel, registry: ReplicaRegistry, require_cert_identity: bool
    ) -> None:
        super().__init__(registry, "", require_cert_identity=require_cert_identity)
        self.control = registry_pb2_grpc.RegistryStub(control)

    async def Join(
        self, request: registry_pb2.JoinRequest, context: Any
    ) -> registry_pb2.JoinResponse:
        problem = self._join_refusal(request, context)
        if problem:
            log.warning("join refused", node_id=request.node_id, reason=problem)
            return registry_pb2.JoinResponse(accepted=False, reason=problem)
        return await _forward(context, self.control.Join(request, timeout=FORWARD_TIMEOUT_S))

    async def Leave(
        self, request: registry_pb2.LeaveRequest, context: Any
    ) -> registry_pb2.LeaveResponse:
        await self._check_leave(request, context)
        return await _forward(context, self.control.Leave(request, timeout=FORWARD_TIMEOUT_S))


async def serve_worker(
    args: argparse.Namespace, guard: security.ServerSecurity, index: int, control_path: str
) -> int:
    stop = servers.stop_event_on_signals()
    control = grpc.aio.insecure_channel(
        f"unix:{control_path}", options=config.RECONNECT_CHANNEL_OPTIONS
    )
    replica = ReplicaRegistry(assembly.connector(args, guard))
    metrics = CoordinatorMetrics()
    dispatcher, admission = assembly.data_plane(args, replica, metrics)
    coordinator = ForwardingCoordinatorService(
        control,
        registry=replica,
        dispatcher=dispatcher,
        strategy=args.strategy,
        health_check_interval_s=args.health_check_interval,
        admission=admission,
    )
    server = servers.new_server(guard.interceptors, args.max_message_bytes, reuse_port=True)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    registry_pb2_grpc.add_RegistryServicer_to_server(
        ForwardingRegistryService(control, replica, guard.tls.require_client_cert), server
    )
    health = servers.add_health_and_reflection(server, SERVICES)
    await servers.set_serving(health, SERVICES, False)
    servers.bind(server, args.listen, guard.tls)
    await server.start()
    # Bound before attaching (as the gRPC port), so that every worker listens by the time
    # the control process publishes the port; calls wait for nodes until the first snapshot.
    http = await start_front_door(args, coordinator, guard, reuse_port=True)
    link = ControlLink(control, index, replica, metrics, dispatcher)
    attach = asyncio.create_task(link.run(), name="attach")
    stopped = asyncio.create_task(stop.wait(), name="stop")
    attached = asyncio.create_task(link.attached.wait(), name="attached")
    await asyncio.wait({attach, stopped, attached}, return_when=asyncio.FIRST_COMPLETED)
    if link.attached.is_set():
        await servers.set_serving(health, SERVICES, True)
        log.info(
            "worker serving",
            address=args.listen,
            pid=os.getpid(),
            **http_address(args, http.port if http is not None else None),
        )
        await asyncio.wait({attach, stopped}, return_when=asyncio.FIRST_COMPLETED)
    attached.cancel()
    code = 0
    if attach.done():
        # The control process is gone (or dropped us): a worker never serves on its own.
        log.warning("control process lost, shutting down", reason=attach.result())
        code = 1
    log.info("worker shutting down", in_flight=dispatcher.counters.in_flight)
    await servers.set_serving(health, SERVICES, False)
    await asyncio.gather(
        server.stop(grace=args.shutdown_grace), *([http.stop()] if http is not None else [])
    )
    attach.cancel()
    stopped.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await attach
    await replica.close()
    await control.close(grace=None)
    log.info("worker stopped")
    return code


def load_args(path: str) -> argparse.Namespace:
    namespace: argparse.Namespace = pickle.loads(Path(path).read_bytes())
    return namespace


def main(argv: list[str] | None = None, run: Callable[..., Any] = asyncio.run) -> int:
    args_file, index_text, control_path = list(sys.argv[1:] if argv is None else argv)
    args = load_args(args_file)
    index = int(index_text)
    configure_logging(args.log_format, args.log_level, worker=index)
    try:
        guard = security.ServerSecurity.from_args(args, security.ROLES, outgoing_role="node")
    except security.SecurityConfigError as exc:
        log.error("worker failed to start", error=str(exc))
        return 2
    try:
        code: int = run(serve_worker(args, guard, index, control_path))
    except OSError as exc:
        log.error("coordinator worker failed to start", error=str(exc))
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
