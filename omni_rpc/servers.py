"""Pieces every omni-rpc gRPC server shares: health, reflection, binding, signals."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path

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


def new_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    max_message_bytes: int = config.MAX_MESSAGE_BYTES,
) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", config.MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", max_message_bytes),
            *config.KEEPALIVE_SERVER_OPTIONS,
        ],
    )


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> HealthServicer:
    """Serve grpc.health.v1 (for "" and each service) and server reflection."""
    names = list(service_names)
    health = HealthServicer()
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
    server = grpc.aio.server()
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
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
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
