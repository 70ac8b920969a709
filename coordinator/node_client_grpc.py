"""The gRPC implementation of ``NodeClient``: one channel per node, with keepalive, carrying
the node's multiplexed data-plane session (``coordinator.session``) and its health checks."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.node_client import NodeCallError, NodeClient
from coordinator.session import AgentSession, SessionAttempt
from omni_rpc import config
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import node_agent_pb2, node_agent_pb2_grpc, node_pb2, registry_pb2

_HEALTH_REQUEST = health_pb2.HealthCheckRequest(service=config.NODE_AGENT_SERVICE)
_LOAD_REQUEST = node_agent_pb2.GetLoadRequest()


def _node_error(exc: grpc.aio.AioRpcError) -> NodeCallError:
    return NodeCallError(exc.code(), exc.details() or "")


def _status_name(status: int) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return name


class GrpcNodeClient:
    """One channel per node: the data plane's multiplexed session, health and load on it."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str = "",
        max_buffered_tokens: int = config.MAX_BUFFERED_TOKENS,
        incarnation: str = "",
    ) -> None:
        self._channel = channel
        # Every call says which process it is meant for: a different process at the address
        # (a restart, or another agent that took the port) refuses it, FAILED_PRECONDITION.
        self._identity: tuple[tuple[str, str], ...] = tuple(
            (key, value)
            for key, value in (
                (config.NODE_ID_METADATA, node_id),
                (config.NODE_INCARNATION_METADATA, incarnation),
            )
            if value
        )
        self._agent = node_agent_pb2_grpc.NodeAgentStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._session = AgentSession(self._open_session, node_id, max_buffered_tokens)

    def _open_session(self) -> Any:
        # No deadline: the session lives as long as the connection; each request carries its own.
        return self._agent.Session(metadata=self._identity)  # type: ignore[call-arg]

    def generate(
        self, first: node_agent_pb2.AgentRequest, timeout_s: float | None
    ) -> SessionAttempt:
        return self._session.start(first, timeout_s)

    async def watch(self) -> AsyncGenerator[str, None]:
        call = self._health.Watch(_HEALTH_REQUEST, metadata=self._identity)
        try:
            async for response in call:
                yield _status_name(response.status)
        except grpc.aio.AioRpcError as exc:
            raise _node_error(exc) from None
        finally:
            call.cancel()

    async def check(self, timeout_s: float) -> str:
        try:
            response = await self._health.Check(
                _HEALTH_REQUEST, timeout=timeout_s, metadata=self._identity
            )
        except grpc.aio.AioRpcError as exc:
            raise _node_error(exc) from None
        return _status_name(response.status)

    async def load(self, timeout_s: float) -> node_pb2.NodeLoad:
        try:
            report: node_pb2.NodeLoad = await self._agent.GetLoad(
                _LOAD_REQUEST, timeout=timeout_s, metadata=self._identity
            )
        except grpc.aio.AioRpcError as exc:
            raise _node_error(exc) from None
        return report

    def report_load(self, listener: Callable[[node_pb2.NodeLoad], None]) -> None:
        self._session.on_load = listener
        self._session.keep_open()

    async def close(self) -> None:
        await self._session.close()
        await self._channel.close(grace=None)


class GrpcConnector:
    """Dials the agents that join, with the coordinator's token and TLS for them."""

    def __init__(
        self,
        security: ChannelSecurity | None = None,
        max_buffered_tokens: int = config.MAX_BUFFERED_TOKENS,
    ) -> None:
        self.security = security or ChannelSecurity()
        self.max_buffered_tokens = max_buffered_tokens

    def __call__(self, node: registry_pb2.JoinRequest) -> NodeClient:
        channel = self.security.aio_channel(
            node.address, [*config.KEEPALIVE_CHANNEL_OPTIONS, *config.SESSION_CHANNEL_OPTIONS]
        )
        return GrpcNodeClient(channel, node.node_id, self.max_buffered_tokens, node.incarnation)
