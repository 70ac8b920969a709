"""Checking the coordinator's port before its workers share it (``--workers N``)."""

from __future__ import annotations

import errno
import socket
from typing import Any

Passive = tuple[socket.AddressFamily, socket.SocketKind, int, tuple[Any, ...]]


def passive_address(listen: str) -> Passive:
    """How to open a listening socket on ``listen`` (HOST:PORT, port 0: any free one): its
    family, type, protocol and address (OSError naming ``listen`` when it cannot resolve)."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(
            host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    return family, kind, proto, address


def reserve_port(listen: str) -> int:
    """The concrete port of ``listen`` (HOST:PORT, port 0: any free one), checked free.

    The probe binds without SO_REUSEPORT, so a port another process listens on (another
    coordinator, or its workers) fails here with an error naming it, before any worker starts;
    the workers then bind it with SO_REUSEPORT among themselves.
    """
    family, kind, proto, address = passive_address(listen)
    with socket.socket(family, kind, proto) as probe:
        # Sockets left in TIME_WAIT by an earlier coordinator do not count as in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            why = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise OSError(f"cannot listen on {listen}: {why}") from None
        return int(probe.getsockname()[1])
