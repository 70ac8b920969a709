"""uvicorn, embedded: the HTTP front door served from the coordinator's own event loop.

The socket is bound here (SO_REUSEPORT when the data-plane workers of ``--workers N`` share
the port, as they share the gRPC one), and uvicorn is driven through its startup, main loop
and shutdown steps rather than ``Server.serve``, which would install its own SIGINT/SIGTERM
handlers over the coordinator's (``servers.stop_event_on_signals``). Lifespan and the access
log are off: one line per request is the dispatcher's "request finished".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl

import uvicorn

from coordinator.http.app import OpenAIApp
from coordinator.ports import passive_address
from coordinator.service import CoordinatorService
from omni_rpc import security, servers

BACKLOG = 2048


def bind_socket(listen: str, reuse_port: bool) -> socket.socket:
    """A listening socket on ``listen`` (HOST:PORT, port 0: any free one)."""
    family, kind, proto, address = passive_address(listen)
    sock = socket.socket(family, kind, proto)
    try:
        # TIME_WAIT sockets of an earlier coordinator do not count as in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen} (HTTP): {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def uvicorn_config(app: OpenAIApp, grace_s: float, tls: security.TlsFiles) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        http="httptools",
        ws="none",
        lifespan="off",
        interface="asgi3",
        access_log=False,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        backlog=BACKLOG,
        # With TLS on the gRPC port, the HTTP port serves the same certificate (and asks
        # for a client certificate when TLS is mutual).
        ssl_certfile=tls.cert,
        ssl_keyfile=tls.key,
        ssl_ca_certs=tls.ca if tls.cert else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE,
    )
    # uvicorn declares it int; asyncio.wait_for, its only reader, takes any number.
    config.timeout_graceful_shutdown = grace_s  # type: ignore[assignment]
    config.load()
    return config


class FrontDoor:
    """One process's HTTP server: ``start``, then ``stop`` (in-flight calls get the grace)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self._ticks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        server = self.server
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[self.sock])
        # uvicorn's once-a-second housekeeping (the Date header); it ends on should_exit.
        self._ticks = asyncio.create_task(server.main_loop(), name="http-ticks")

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace, then cancel them."""
        self.server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        await self.server.shutdown(sockets=[self.sock])


async def start_front_door(
    args: argparse.Namespace,
    service: CoordinatorService,
    guard: security.ServerSecurity,
    *,
    reuse_port: bool = False,
) -> FrontDoor | None:
    """Serve ``--http-listen`` (None when not given) from ``service``."""
    if not args.http_listen:
        return None
    app = OpenAIApp(service, guard.interceptor, max_body_bytes=args.max_message_bytes)
    sock = bind_socket(args.http_listen, reuse_port)
    try:
        door = FrontDoor(uvicorn_config(app, args.shutdown_grace, guard.tls), sock)
        await door.start()
    except BaseException:
        sock.close()
        raise
    return door


def http_address(args: argparse.Namespace, port: int | None) -> dict[str, str]:
    """The ``http_address`` field of the "serving" log line (none without --http-listen)."""
    if port is None or not args.http_listen:
        return {}
    return {"http_address": servers.advertised(args.http_listen, port)}
