"""Coordinator addresses: one, a list of several, or a DNS name that stands for several.

The forms, the same for ``omni-agent --coordinator``, the SDK's ``coordinator=`` and the
``omni`` CLI's ``--coordinator``:

- ``HOST:PORT``: a coordinator;
- ``HOST:PORT,HOST:PORT``: several coordinators (a list in Python works too);
- ``dns:///NAME:PORT``: every address ``NAME`` resolves to is a coordinator, as a Kubernetes
  headless Service gives one per coordinator pod.

Agents join every coordinator: every address of every name they are given (IPv4 ones when a
name has any), resolved again every ``--coordinator-resolve-interval`` (``resolve_every_address``).
Clients balance their calls over several coordinators with gRPC's own ``round_robin`` policy
(``client_channel_target``): a list, or a ``dns:///`` name, which gRPC's DNS resolver re-resolves
as connections break; a plain ``HOST:PORT`` is one connection (gRPC uses the first address that
answers).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DNS_SCHEME = "dns:///"

# gRPC's channel option that makes a channel spread its calls over every address of its
# target (gRPC's default, pick_first, would send them all to the first that answers).
ROUND_ROBIN_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
]


@dataclass(frozen=True)
class CoordinatorTarget:
    """One item of a coordinator address list."""

    host: str
    port: int
    # dns:///: the name stands for every address it resolves to.
    every_address: bool = False

    @property
    def address(self) -> str:
        """HOST:PORT (an IPv6 literal in brackets)."""
        return join_host_port(self.host, self.port)

    def __str__(self) -> str:
        return (DNS_SCHEME if self.every_address else "") + self.address


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(text: str, whole: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(
            f"coordinator address {whole!r}: expected HOST:PORT, a comma-separated list of them, "
            f"or {DNS_SCHEME}NAME:PORT"
        )
    return host, int(port)


def parse_targets(given: str | Sequence[str]) -> list[CoordinatorTarget]:
    """The coordinators ``given`` names (see the module's forms); ValueError when malformed
    or empty. Duplicates are dropped, order is kept."""
    items = given.split(",") if isinstance(given, str) else [str(item) for item in given]
    targets: list[CoordinatorTarget] = []
    for raw in items:
        text = raw.strip()
        if not text:
            continue
        every = text.startswith(DNS_SCHEME)
        if every:
            text = text[len(DNS_SCHEME) :]
        elif "://" in text or text.startswith("dns:"):
            raise ValueError(
                f"coordinator address {raw.strip()!r}: the only scheme is {DNS_SCHEME} "
                "(every address of a name)"
            )
        host, port = _split_host_port(text, raw.strip())
        target = CoordinatorTarget(host, port, every)
        if target not in targets:
            targets.append(target)
    if not targets:
        raise ValueError("no coordinator address given")
    return targets


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _first_address(host: str, port: int) -> str:
    """The address a client dials for one list item: an IP literal as is, a name resolved now
    (IPv4 preferred: gRPC's ipv4:/ipv6: targets take literals of one family)."""
    if is_ip(host):
        return host
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"coordinator host {host!r} does not resolve: {exc}") from None
    addresses = [str(info[4][0]) for info in found]
    v4 = [a for a in addresses if ":" not in a]
    return (v4 or addresses)[0]


def client_channel_target(given: str | Sequence[str]) -> tuple[str, list[tuple[str, Any]]]:
    """The gRPC target and channel options for a client of the coordinators ``given``.

    One ``HOST:PORT``: itself, gRPC's defaults. ``dns:///NAME:PORT``: itself, round robin over
    every address (gRPC re-resolves the name when connections break). A list: an ``ipv4:`` (or
    ``ipv6:``) target of its addresses, names resolved now, round robin over them; a
    coordinator down is skipped until it answers again.
    """
    targets = parse_targets(given)
    if len(targets) == 1:
        only = targets[0]
        return str(only), (ROUND_ROBIN_OPTIONS if only.every_address else [])
    if any(t.every_address for t in targets):
        raise ValueError(
            f"{DNS_SCHEME} names one set of coordinators by itself: give it alone, or a list "
            "of HOST:PORT"
        )
    hosts = [(_first_address(t.host, t.port), t.port) for t in targets]
    families = {":" in host for host, _ in hosts}
    if len(families) > 1:
        raise ValueError(
            "coordinator addresses mix IPv4 and IPv6: gRPC balances over one family; "
            f"give addresses of one family or a {DNS_SCHEME} name"
        )
    scheme = "ipv6" if families == {True} else "ipv4"
    return f"{scheme}:" + ",".join(join_host_port(h, p) for h, p in hosts), ROUND_ROBIN_OPTIONS


def describe_checked(given: str | Sequence[str]) -> str:
    """``given`` as one line (``a:1,b:2`` or ``dns:///name:port``); ValueError if malformed."""
    return ",".join(str(t) for t in parse_targets(given))


def describe(given: str | Sequence[str]) -> str:
    """The coordinators as one line, for messages: ``a:1,b:2`` or ``dns:///name:port``."""
    try:
        return ",".join(str(t) for t in parse_targets(given))
    except ValueError:
        return given if isinstance(given, str) else ",".join(map(str, given))


def _one_family(addresses: list[str]) -> list[str]:
    """The IPv4 addresses when there are any, else the IPv6 ones, sorted: a dual-stack name
    (``localhost``, a dual-stack headless Service) lists each coordinator once per family, and
    a server listening on IPv4 only must not be dialed at its IPv6 address forever."""
    v4 = sorted({a for a in addresses if ":" not in a})
    return v4 or sorted(set(addresses))


async def resolve_every_address(target: CoordinatorTarget) -> list[str]:
    """The HOST:PORT of every coordinator ``target`` stands for, as an agent joins them: an IP
    literal itself, a name one per address it resolves to (of one family, see
    ``_one_family``), sorted. OSError when the name does not resolve."""
    if is_ip(target.host):
        return [target.address]
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    return [join_host_port(a, target.port) for a in _one_family([str(i[4][0]) for i in found])]


def every_coordinator(given: str | Sequence[str]) -> list[str]:
    """HOST:PORT of each coordinator ``given`` stands for (``dns:///`` names resolved now): for
    what must reach every coordinator, as a drain does (each has its own registry). OSError
    when a name does not resolve."""
    found: list[str] = []
    for target in parse_targets(given):
        if is_ip(target.host):
            addresses = [target.address]
        else:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            ips = _one_family([str(i[4][0]) for i in infos])
            addresses = [join_host_port(ip, target.port) for ip in ips]
        found += [a for a in addresses if a not in found]
    return found
