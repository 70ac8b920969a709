"""The agent's side of membership: join the coordinator, stay joined, leave.

The registry is soft state: the agent re-joins every ``refresh_interval_s`` and as soon as it
loses the coordinator (its health stream breaks or turns NOT_SERVING), retrying with backoff,
so a restarted coordinator is repopulated without touching any node.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omni_rpc import config
from omni_rpc.backoff import Backoff
from omni_rpc.logging import get_logger
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import registry_pb2, registry_pb2_grpc

log = get_logger("node_agent.membership")


class Membership:
    def __init__(
        self,
        coordinator: str,
        join_request: registry_pb2.JoinRequest,
        channels: ChannelSecurity | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.join_request = join_request
        self.coordinator_id = ""
        self.joined = asyncio.Event()
        self._security = channels or ChannelSecurity()
        self._open_channel()

    def _open_channel(self) -> None:
        self._stamp = self._security.files_stamp()
        self._channel = self._security.aio_channel(self.coordinator)
        self._registry = registry_pb2_grpc.RegistryStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def _renew_channel_if_stale(self) -> None:
        """After a certificate renewal, dial with the new certificate (gRPC reads the
        files once per channel)."""
        if self._security.files_stamp() != self._stamp:
            old = self._channel
            self._open_channel()
            log.info("TLS files changed: new channel to the coordinator")
            await old.close(None)

    async def run(self) -> None:
        """Join and stay joined until cancelled."""
        backoff = Backoff(config.JOIN_BACKOFF_BASE_S, config.JOIN_BACKOFF_CAP_S)
        node_id = self.join_request.node_id
        while True:
            await self._renew_channel_if_stale()
            try:
                response = await self._registry.Join(
                    self.join_request, timeout=config.JOIN_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                self.joined.clear()
                delay = backoff.next_delay()
                log.warning(
                    "cannot join the coordinator, retrying",
                    node_id=node_id,
                    coordinator=self.coordinator,
                    code=exc.code().name,
                    error=exc.details(),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if not response.accepted:
                self.joined.clear()
                delay = backoff.next_delay()
                log.warning(
                    "coordinator refused the join, retrying",
                    node_id=node_id,
                    reason=response.reason,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if response.coordinator_id != self.coordinator_id or not self.joined.is_set():
                log.info(
                    "joined the coordinator",
                    node_id=node_id,
                    coordinator=self.coordinator,
                    coordinator_id=response.coordinator_id,
                )
            self.coordinator_id = response.coordinator_id
            self.joined.set()
            backoff.reset()
            reason = await self._hold(response.refresh_interval_s or config.JOIN_REFRESH_INTERVAL_S)
            if reason:
                self.joined.clear()
                log.warning("lost the coordinator, re-joining", node_id=node_id, reason=reason)
                await backoff.sleep()

    async def _hold(self, refresh_interval_s: float) -> str | None:
        """Watch the coordinator's health until the next refresh is due.

        Returns None when it is simply time to refresh, or why the coordinator was lost.
        """
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=config.REGISTRY_SERVICE))
        try:
            async with asyncio.timeout(refresh_interval_s):
                async for status in call:
                    if status.status != health_pb2.HealthCheckResponse.SERVING:
                        return "coordinator reports NOT_SERVING"
            return "coordinator health stream ended"
        except TimeoutError:
            return None
        except grpc.aio.AioRpcError as exc:
            return f"coordinator health stream broke: {exc.code().name}"
        finally:
            call.cancel()

    async def leave(self, reason: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._registry.Leave(
                registry_pb2.LeaveRequest(
                    node_id=self.join_request.node_id,
                    reason=reason,
                    address=self.join_request.address,
                ),
                timeout=2.0,
            )

    async def close(self) -> None:
        await self._channel.close(None)
