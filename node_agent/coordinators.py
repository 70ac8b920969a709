"""The agent's coordinators: one membership per coordinator, kept up independently.

``--coordinator`` names one coordinator, a list, or ``dns:///NAME:PORT``; a name stands for
every address it resolves to, as a Kubernetes headless Service gives one per coordinator pod
(see ``omni_rpc.targets``). Each coordinator keeps its own registry: the agent joins every one,
a coordinator that is down costs only its own membership's retries, and the agent serves
whichever coordinators dial it. Names are resolved again every ``resolve_interval_s``: a
coordinator that appears is joined, one whose address is gone is let go.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from node_agent.membership import Membership
from omni_rpc import targets
from omni_rpc.logging import get_logger
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import registry_pb2

log = get_logger("node_agent.coordinators")

DEFAULT_RESOLVE_INTERVAL_S = 10.0


class Coordinators:
    def __init__(
        self,
        given: str,
        join_request: registry_pb2.JoinRequest,
        channels: ChannelSecurity | None = None,
        resolve_interval_s: float = DEFAULT_RESOLVE_INTERVAL_S,
    ) -> None:
        self.targets = targets.parse_targets(given)
        self.join_request = join_request
        self.resolve_interval_s = resolve_interval_s
        self._security = channels or ChannelSecurity()
        # By the address dialed: the membership and the task keeping it up.
        self.memberships: dict[str, tuple[Membership, asyncio.Task[None]]] = {}

    def _security_for(self, target: targets.CoordinatorTarget) -> ChannelSecurity:
        """A resolved address is dialed by IP: with TLS, the coordinator's certificate is
        checked against the name that was resolved (unless a server name is set already; an
        IP literal is checked as itself)."""
        if self._security.tls.enabled and not self._security.server_name:
            return dataclasses.replace(self._security, server_name=target.host)
        return self._security

    async def _addresses(self) -> dict[str, targets.CoordinatorTarget] | None:
        """Every coordinator address now, or None when a name did not resolve (keep the
        memberships as they are: a DNS hiccup must not drop live coordinators)."""
        found: dict[str, targets.CoordinatorTarget] = {}
        for target in self.targets:
            try:
                for address in await targets.resolve_every_address(target):
                    found.setdefault(address, target)
            except OSError as exc:
                log.warning(
                    "cannot resolve the coordinators' name, keeping the ones known",
                    coordinator=str(target),
                    error=str(exc),
                    known=sorted(self.memberships),
                )
                return None
        return found

    def _start(self, address: str, target: targets.CoordinatorTarget) -> None:
        membership = Membership(address, self.join_request, self._security_for(target))
        task = asyncio.create_task(membership.run(), name=f"membership {address}")
        self.memberships[address] = (membership, task)
        log.info("coordinator found", coordinator=address, target=str(target))

    async def _stop(self, address: str) -> None:
        membership, task = self.memberships.pop(address)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await membership.close()
        log.info("coordinator gone from the name's addresses: let go", coordinator=address)

    async def run(self) -> None:
        """Keep one membership per coordinator until cancelled."""
        try:
            while True:
                found = await self._addresses()
                if found is not None:
                    for address, target in found.items():
                        if address not in self.memberships:
                            self._start(address, target)
                    for address in [a for a in self.memberships if a not in found]:
                        await self._stop(address)
                if all(targets.is_ip(t.host) for t in self.targets):
                    # IP addresses only: nothing to re-resolve.
                    await asyncio.Event().wait()
                # Until a name resolves at all, try again soon.
                await asyncio.sleep(self.resolve_interval_s if self.memberships else 1.0)
        finally:
            for _, task in self.memberships.values():
                task.cancel()

    @property
    def joined(self) -> list[str]:
        """The addresses of the coordinators this agent is a member of now."""
        return [a for a, (m, _) in self.memberships.items() if m.joined.is_set()]

    async def leave(self, reason: str) -> None:
        """Leave every coordinator at once (each call is bounded)."""
        await asyncio.gather(*(m.leave(reason) for m, _ in self.memberships.values()))

    async def close(self) -> None:
        for membership, task in self.memberships.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await membership.close()
