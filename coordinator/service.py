"""The Coordinator and Registry gRPC services: thin adapters over dispatch and the registry."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from coordinator.admission import Admission, LimitExceeded
from coordinator.dispatch import Dispatcher, DispatchError
from coordinator.registry import Registry
from coordinator.stats import cluster_stats
from omni_rpc import config
from omni_rpc.logging import get_logger
from omni_rpc.security import client_identity, peer_identities
from omni_rpc.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    generate_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from omni_rpc.validation import InvalidRequest, validate_request

log = get_logger("coordinator.service")


class GenerateError(Exception):
    """How a Generate call ends when it cannot be served: its status, final (clients must not
    retry it as if the coordinator had been unreachable). ``field``: the request field at
    fault, when validation names one."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(
        self,
        registry: Registry,
        dispatcher: Dispatcher,
        *,
        strategy: str,
        health_check_interval_s: float,
        admission: Admission,
    ) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.strategy = strategy
        self.health_check_interval_s = health_check_interval_s
        self.admission = admission
        self.max_tokens_cap = admission.limits.max_tokens_cap
        self.coordinator_id = uuid.uuid4().hex[:12]
        self.started_at = time.time()

    async def Generate(
        self,
        request: generate_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[
            generate_pb2.GenerateRequest, generate_pb2.GenerateResponse
        ],
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        try:
            # Closed here, not when collected: a client that goes away frees its node now.
            async with contextlib.aclosing(
                self.stream(request, client_identity(context), context.time_remaining())
            ) as responses:
                async for response in responses:
                    yield response
        except GenerateError as exc:
            # Marks the status as the coordinator's verdict: clients must not retry it as if
            # the coordinator had been unreachable.
            context.set_trailing_metadata(((config.FINAL_ERROR_METADATA, "1"),))
            await context.abort(exc.code, exc.message)

    async def stream(
        self,
        request: generate_pb2.GenerateRequest,
        client: str,
        time_remaining: float | None,
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        """One Generate call for ``client``, whatever its transport (gRPC here, HTTP in
        ``coordinator/http/``): the request's limits and validation, a stream slot, then the
        dispatcher's responses (failover and resume included). Raises GenerateError, final."""
        try:
            self.admission.check_request(request)
            validate_request(request, max_tokens_cap=self.max_tokens_cap)
        except LimitExceeded as exc:
            raise self._refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except InvalidRequest as exc:
            raise self._refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.field) from None
        try:
            with self.admission.admit(client):
                async with contextlib.aclosing(
                    self.dispatcher.generate(request, time_remaining)
                ) as responses:
                    async for response in responses:
                        yield response
        except LimitExceeded as exc:
            raise self._refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except DispatchError as exc:
            # Logged once by the dispatcher ("request finished", with node and error).
            raise GenerateError(exc.code, exc.message) from None

    def _refusal(self, code: grpc.StatusCode, message: str, field: str = "") -> GenerateError:
        """A call failed before any node is involved (counted here: the dispatcher never saw
        it)."""
        self.dispatcher.metrics.requests.labels(code.name).inc()
        return GenerateError(code, message, field)

    async def GetStats(
        self,
        request: coordinator_pb2.GetStatsRequest,
        context: grpc.aio.ServicerContext[
            coordinator_pb2.GetStatsRequest, coordinator_pb2.ClusterStats
        ],
    ) -> coordinator_pb2.ClusterStats:
        return cluster_stats(
            self.registry,
            self.dispatcher.counters,
            strategy=self.strategy,
            health_check_interval_s=self.health_check_interval_s,
            max_retries=self.dispatcher.max_retries,
            coordinator_id=self.coordinator_id,
            started_at=self.started_at,
        )

    async def ListNodes(
        self,
        request: coordinator_pb2.ListNodesRequest,
        context: grpc.aio.ServicerContext[
            coordinator_pb2.ListNodesRequest, coordinator_pb2.ListNodesResponse
        ],
    ) -> coordinator_pb2.ListNodesResponse:
        nodes = sorted(self.registry.nodes.values(), key=lambda n: n.node_id)
        return coordinator_pb2.ListNodesResponse(nodes=[n.to_proto() for n in nodes])

    async def DrainNode(
        self,
        request: coordinator_pb2.DrainNodeRequest,
        context: grpc.aio.ServicerContext[
            coordinator_pb2.DrainNodeRequest, coordinator_pb2.DrainNodeResponse
        ],
    ) -> coordinator_pb2.DrainNodeResponse:
        node = self.registry.nodes.get(request.node_id)
        if node is None:
            known = ", ".join(sorted(self.registry.nodes)) or "none"
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no node {request.node_id!r} (known: {known})"
            )
        assert node is not None
        self.registry.set_drained(node, not request.undrain)
        return coordinator_pb2.DrainNodeResponse(
            node=node.to_proto(), drained=node.drained and node.in_flight == 0
        )


class RegistryService(registry_pb2_grpc.RegistryServicer):
    def __init__(
        self, registry: Registry, coordinator_id: str, require_cert_identity: bool = False
    ) -> None:
        self.registry = registry
        self.coordinator_id = coordinator_id
        # With mutual TLS a node may only join under a name its certificate carries.
        self.require_cert_identity = require_cert_identity

    async def Join(
        self,
        request: registry_pb2.JoinRequest,
        context: grpc.aio.ServicerContext[registry_pb2.JoinRequest, registry_pb2.JoinResponse],
    ) -> registry_pb2.JoinResponse:
        problem = self._join_refusal(request, context)
        if not problem:
            problem = self.registry.takeover_problem(request)
        if problem:
            log.warning("join refused", node_id=request.node_id, reason=problem)
            return registry_pb2.JoinResponse(accepted=False, reason=problem)
        self.registry.join(request)
        return registry_pb2.JoinResponse(
            accepted=True,
            coordinator_id=self.coordinator_id,
            refresh_interval_s=config.JOIN_REFRESH_INTERVAL_S,
        )

    async def Leave(
        self,
        request: registry_pb2.LeaveRequest,
        context: grpc.aio.ServicerContext[registry_pb2.LeaveRequest, registry_pb2.LeaveResponse],
    ) -> registry_pb2.LeaveResponse:
        await self._check_leave(request, context)
        self.registry.leave(request.node_id, request.reason, request.address)
        return registry_pb2.LeaveResponse()

    def _join_refusal(
        self, request: registry_pb2.JoinRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> str:
        """Why a join is refused on what the call itself shows (its fields, the caller's
        certificate); empty if it is not."""
        return _join_problem(request) or self._identity_problem(request, context)

    async def _check_leave(
        self, request: registry_pb2.LeaveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """Abort a leave the caller may not ask for (another node's, with mutual TLS)."""
        if self.require_cert_identity and request.node_id not in peer_identities(context):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {request.node_id!r} may only be removed by itself (certificate identity)",
            )

    def _identity_problem(
        self, request: registry_pb2.JoinRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> str:
        if not self.require_cert_identity:
            return ""
        names = peer_identities(context)
        if request.node_id in names:
            return ""
        return (
            f"node id {request.node_id!r} does not match the client certificate "
            f"(names: {', '.join(names) or 'none'})"
        )


def _join_problem(request: registry_pb2.JoinRequest) -> str:
    if not request.node_id:
        return "node_id is empty"
    host, sep, port = request.address.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return f"address must be HOST:PORT, got {request.address!r}"
    if request.capacity < 0:
        return f"capacity must be >= 0, got {request.capacity}"
    return ""
