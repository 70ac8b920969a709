"""Who this agent is: its node id, its incarnation, and the check that a call is meant for it.

The node id names the node in the coordinator's registry and should survive restarts (else a
restarted agent leaves a dead entry behind). The incarnation is a random id chosen when the
process starts (sent in every Join): a restart, or another process now listening at the same
address, has a new one. The coordinator may send both back in every call's metadata
(``omni-node-id``, ``omni-node-incarnation``); a call meant for another node or incarnation is
refused with FAILED_PRECONDITION, so the caller learns that the node it registered is gone
instead of being served by a stranger. Calls without those keys (probes, grpcurl, direct use)
are served as before.
"""

from __future__ import annotations

import secrets
from typing import Any

import grpc

from omni_rpc import config
from omni_rpc.security import rejection

# What a refusal's details start with (the coordinator recognises it).
MISMATCH_PREFIX = config.IDENTITY_MISMATCH_PREFIX


def new_incarnation() -> str:
    """A random id for this process's lifetime (64 bits, hex)."""
    return secrets.token_hex(8)


def default_node_id(host: str, gpu_index: int, listen: str) -> str:
    """The node id of an agent started without ``--node-id``, stable across restarts.

    ``{host}-gpu{index}`` on a GPU (one agent per GPU); else ``{host}-{port}`` when ``listen``
    names a fixed port; else ``{host}-cpu`` (several CPU agents on one host listening on
    port 0 need --node-id or fixed ports: the coordinator refuses a second live holder).
    """
    if gpu_index >= 0:
        return f"{host}-gpu{gpu_index}"
    port = listen.rsplit(":", 1)[-1] if ":" in listen else ""
    if port.isdigit() and int(port) != 0:
        return f"{host}-{int(port)}"
    return f"{host}-cpu"


def mismatch(node_id: str, incarnation: str, metadata: Any) -> str | None:
    """Why a call with invocation ``metadata`` is not for this node, or None if it may be.

    A key that is absent or empty expects nothing.
    """
    wanted_id = wanted_incarnation = ""
    for key, value in metadata or ():
        if key == config.NODE_ID_METADATA:
            wanted_id = value
        elif key == config.NODE_INCARNATION_METADATA:
            wanted_incarnation = value
    id_differs = bool(wanted_id) and wanted_id != node_id
    incarnation_differs = bool(wanted_incarnation) and wanted_incarnation != incarnation
    if not id_differs and not incarnation_differs:
        return None
    if not wanted_id:
        expected = f"incarnation {wanted_incarnation}"
    elif not wanted_incarnation:
        expected = f"node {wanted_id!r}"
    else:
        expected = f"node {wanted_id!r} (incarnation {wanted_incarnation})"
    return (
        f"{MISMATCH_PREFIX}this is node {node_id!r} (incarnation {incarnation or 'none'}), "
        f"the caller expected {expected}"
    )


class IdentityGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuse calls whose ``omni-node-id`` / ``omni-node-incarnation`` metadata name another
    node or incarnation (FAILED_PRECONDITION, details starting "node identity mismatch: ")."""

    def __init__(self, node_id: str, incarnation: str) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        # Refusing handlers by method: built once each (bounded by the registered methods).
        self._refusing: dict[str, Any] = {}

    def _mismatch(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        found = mismatch(self.node_id, self.incarnation, context.invocation_metadata())
        return found or MISMATCH_PREFIX

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if mismatch(self.node_id, self.incarnation, details.invocation_metadata) is None:
            return await continuation(details)
        refusing = self._refusing.get(details.method)
        if refusing is None:
            handler = await continuation(details)
            if handler is None:
                return None  # an unknown method: UNIMPLEMENTED, as without the guard
            refusing = self._refusing[details.method] = rejection(
                handler, grpc.StatusCode.FAILED_PRECONDITION, self._mismatch
            )
        return refusing
