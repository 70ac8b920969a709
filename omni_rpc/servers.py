"""Pieces every omni-rpc gRPC server shares: health, reflection, binding, signals."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from omni_rpc import argtypes, config
from omni_rpc.logging import LOG_FORMATS, get_logger
from omni_rpc.security import TlsFiles, server_credentials


def add_process_options(p: argparse.ArgumentParser) -> None:
    """The options every server process has: metrics, logging, and where to publish its port."""
    p.add_argument(
        "--metrics-port",
        type=argtypes.non_negative_int,
        help="serve Prometheus metrics on this port (0: any free one); off when not given",
    )
    p.add_argument("--metrics-port-file", help="write the metrics port to this file")
    p.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--port-file", help="write the bound port to this file once serving")
    p.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="also serve grpc.health.v1 alone, in plaintext and without tokens, here: for "
        "probes that cannot speak TLS (Kubernetes' gRPC probes) when the main port does",
    )


class _Undecodable:
    """What a request that does not parse becomes, so the handler can refuse it properly."""

    def __init__(self, error: Exception) -> None:
        self.error = f"request message does not parse: {type(error).__name__}: {error}"


class UndecodableRequest(Exception):
    """A message of a request stream did not parse. Raised to the handler (its reader), and
    turned into INVALID_ARGUMENT once the handler has returned: aborting from inside the
    iterator could collide with a write the handler has in flight (gRPC refuses a second
    operation of the same kind on a call), and the handler ends its own work first."""


def _guarded(handler: Any) -> Any:
    """``handler`` with a deserializer that cannot raise: a malformed request is answered
    INVALID_ARGUMENT by the handler, where gRPC alone would say UNKNOWN and log a traceback."""
    decode = handler.request_deserializer
    if decode is None:
        return handler

    def safe_decode(data: bytes) -> Any:
        try:
            return decode(data)
        except Exception as exc:
            return _Undecodable(exc)

    async def refuse(context: grpc.aio.ServicerContext[Any, Any], bad: _Undecodable) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.error)

    def checked_iterator(requests: Any, context: Any) -> Any:
        async def check() -> Any:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    raise UndecodableRequest(request.error)
                yield request

        return check()

    def wrap(behavior: Any, streaming_request: bool) -> Any:
        def checked(request: Any, context: Any) -> Any:
            if streaming_request:
                return behavior(checked_iterator(request, context), context)
            if isinstance(request, _Undecodable):
                if inspect.isasyncgenfunction(behavior):

                    async def refused_stream() -> Any:
                        await refuse(context, request)
                        yield  # pragma: no cover

                    return refused_stream()
                return refuse(context, request)
            return behavior(request, context)

        if inspect.isasyncgenfunction(behavior):

            async def checked_stream(request: Any, context: Any) -> Any:
                try:
                    async for response in checked(request, context):
                        yield response
                except UndecodableRequest as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

            return checked_stream

        async def checked_call(request: Any, context: Any) -> Any:
            try:
                return await checked(request, context)
            except UndecodableRequest as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return checked_call

    encode = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False), safe_decode, encode
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False), safe_decode, encode
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True), safe_decode, encode
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), safe_decode, encode
    )


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self) -> None:
        # Guarded handlers by method: built once each, not on every call. Bounded by the
        # methods the server registers (unknown ones have no handler and are not kept).
        self._guarded: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        guarded = self._guarded.get(details.method)
        if guarded is None:
            handler = await continuation(details)
            if handler is None:
                return None
            guarded = self._guarded[details.method] = _guarded(handler)
        return guarded


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    max_message_bytes: int = config.MAX_MESSAGE_BYTES,
    reuse_port: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Server:
    """A server; ``reuse_port`` lets the processes of one coordinator share its port
    (SO_REUSEPORT). Off, a port another process listens on fails to bind: gRPC would
    otherwise turn SO_REUSEPORT on by itself (on Linux) and share the port silently.
    ``options`` are added to (or override) the shared ones."""
    return grpc.aio.server(
        # Auth first: an unauthenticated caller learns nothing, not even a parse error.
        interceptors=[*interceptors, DecodeGuard()],
        options=[
            ("grpc.max_send_message_length", config.MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *config.KEEPALIVE_SERVER_OPTIONS,
            *options,
        ],
    )


class ListingHealthServicer(HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 with List, which grpcio-health-checking's async servicer lacks."""

    async def List(self, request: Any, context: Any) -> Any:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        return health_pb2.HealthListResponse(statuses=statuses)


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> HealthServicer:
    """Serve grpc.health.v1 (for "" and each service) and server reflection."""
    names = list(service_names)
    health = ListingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return health


async def start_health_only(health: HealthServicer, listen: str | None) -> grpc.aio.Server | None:
    """A second, plaintext server carrying only ``health`` (the same statuses)."""
    if not listen:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bind(server, listen)
    await server.start()
    return server


async def set_serving(health: HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await health.set(name, status)


def bind(server: grpc.aio.Server, listen: str, tls: TlsFiles | None = None) -> int:
    """Bind ``listen`` (host:port, port 0 for any free one), with TLS when ``tls`` has a
    certificate; return the real port."""
    try:
        if tls is not None and tls.cert:
            port = server.add_secure_port(listen, server_credentials(tls))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as exc:  # grpc reports a taken or bad address this way
        raise OSError(f"cannot listen on {listen} (address in use?): {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use?)")
    return port


def advertised(listen: str, port: int) -> str:
    """The address peers should dial: the listen host with the real port."""
    host = listen.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def write_port_file(path: str | None, port: int) -> None:
    """Atomically publish the bound port (launchers wait for this file)."""
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, for a graceful shutdown, or when the launcher that
    started this process (``OMNI_PARENT_PID``) is gone."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.environ.get(config.PARENT_PID_ENV)
    if parent and parent.isdigit():
        task = loop.create_task(_stop_when_orphaned(int(parent), stop))
        _background.add(task)
        task.add_done_callback(_background.discard)
    return stop


_background: set[asyncio.Task[None]] = set()


async def _stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != parent_pid:
            get_logger("omni_rpc.servers").warning(
                "launcher process is gone, shutting down", parent_pid=parent_pid
            )
            stop.set()
            return
        await asyncio.sleep(config.ORPHAN_CHECK_INTERVAL_S)
