"""omni-coordinator: the registry, health monitor, balancer and dispatcher in one server.

With ``--workers N`` (N > 1) one control process keeps the registry, health monitoring, the
circuit breaker, stats and metrics, and N worker processes serve Generate on the shared port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from coordinator import assembly, control
from coordinator.http.server import http_address, start_front_door
from coordinator.registry import state_name
from coordinator.service import CoordinatorService, RegistryService
from coordinator.strategies import STRATEGIES
from coordinator.strategies.cache_aware import (
    DEFAULT_BALANCE_ABS_THRESHOLD,
    DEFAULT_BALANCE_REL_THRESHOLD,
)
from omni_rpc import argtypes, config, security, servers, settings
from omni_rpc.logging import configure_logging, get_logger
from omni_rpc.metrics import CoordinatorMetrics, cache_counts, serve_metrics
from omni_rpc.v1 import coordinator_pb2_grpc, registry_pb2_grpc

log = get_logger("coordinator")

SERVICES = [config.COORDINATOR_SERVICE, config.REGISTRY_SERVICE]


def workers_count(text: str) -> int:
    """``--workers``: a positive number, or ``auto`` for one per CPU core this process may use."""
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    try:
        return argtypes.positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 1 or auto, got {text}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-coordinator", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0: any free)")
    p.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="also serve the OpenAI-compatible HTTP API here (port 0: any free; docs/http.md); "
        "off when not given",
    )
    p.add_argument("--http-port-file", help="write the bound HTTP port to this file once serving")
    p.add_argument(
        "--workers",
        type=workers_count,
        default=config.DEFAULT_COORDINATOR_WORKERS,
        help="processes serving Generate on the port (auto: one per core); above 1, a control "
        "process keeps the registry, health checks, stats and metrics (default: %(default)s)",
    )
    p.add_argument(
        "--strategy",
        default=config.DEFAULT_STRATEGY,
        help=f"load balancing strategy: {', '.join(sorted(STRATEGIES))}",
    )
    p.add_argument(
        "--cache-balance-abs-threshold",
        type=argtypes.non_negative_int,
        default=DEFAULT_BALANCE_ABS_THRESHOLD,
        metavar="N",
        help="cache_aware: load wins over a cached prefix when the node holding it has more "
        "than N requests more than the least loaded node, and (--cache-balance-rel-threshold) "
        "more than R times as many",
    )
    p.add_argument(
        "--cache-balance-rel-threshold",
        type=argtypes.positive_float,
        default=DEFAULT_BALANCE_REL_THRESHOLD,
        metavar="R",
        help="cache_aware: see --cache-balance-abs-threshold",
    )
    p.add_argument(
        "--health-check-interval",
        type=argtypes.positive_float,
        default=config.DEFAULT_HEALTH_CHECK_INTERVAL_S,
        help="seconds between checks",
    )
    p.add_argument(
        "--health-check-timeout",
        type=argtypes.positive_float,
        default=config.DEFAULT_HEALTH_CHECK_TIMEOUT_S,
        help="deadline of each active health check, seconds",
    )
    p.add_argument(
        "--max-retries",
        type=argtypes.non_negative_int,
        default=config.DEFAULT_MAX_RETRIES,
        help="further attempts on other nodes after a failure",
    )
    limits = p.add_argument_group("limits (over one: RESOURCE_EXHAUSTED naming it)")
    limits.add_argument(
        "--max-tokens-cap", type=argtypes.positive_int, default=config.MAX_TOKENS_CAP
    )
    limits.add_argument(
        "--max-prompt-bytes",
        type=argtypes.positive_int,
        default=config.MAX_PROMPT_BYTES,
        help="prompt size (UTF-8 bytes; 4 per prompt token id)",
    )
    limits.add_argument(
        "--max-media-bytes",
        type=argtypes.positive_int,
        default=config.MAX_MEDIA_BYTES,
        help="media data of one request (inputs and chat media parts; not prompt bytes)",
    )
    limits.add_argument(
        "--max-message-bytes",
        type=argtypes.positive_int,
        default=config.MAX_CLIENT_MESSAGE_BYTES,
        help="largest request message accepted",
    )
    limits.add_argument(
        "--max-streams",
        type=argtypes.positive_int,
        default=config.MAX_STREAMS,
        help="concurrent Generate calls in all",
    )
    limits.add_argument(
        "--max-streams-per-client",
        type=argtypes.positive_int,
        default=config.MAX_STREAMS_PER_CLIENT,
        help="concurrent Generate calls per client (token, certificate or IP address)",
    )
    limits.add_argument(
        "--max-queue",
        type=argtypes.non_negative_int,
        default=config.MAX_QUEUE,
        help="calls admitted beyond the healthy nodes' total capacity",
    )
    p.add_argument(
        "--stream-interval",
        type=argtypes.positive_int,
        default=config.DEFAULT_STREAM_INTERVAL,
        help="fewest new tokens per streamed message, for requests that do not set stream_interval",
    )
    p.add_argument(
        "--max-buffered-tokens",
        type=argtypes.positive_int,
        default=config.MAX_BUFFERED_TOKENS,
        help="output held for one request whose client is not reading, in tokens",
    )
    p.add_argument(
        "--no-node-wait",
        type=argtypes.non_negative_float,
        default=config.NO_NODE_WAIT_S,
        help="without a caller deadline, how long Generate waits for a healthy node",
    )
    p.add_argument(
        "--shutdown-grace",
        type=argtypes.non_negative_float,
        default=config.SHUTDOWN_GRACE_S,
        help="seconds in-flight calls get to finish after SIGTERM",
    )
    p.add_argument(
        "--breaker-failures",
        type=argtypes.positive_int,
        default=config.BREAKER_CONSECUTIVE_FAILURES,
        help="consecutive node-level request failures that eject a node",
    )
    p.add_argument(
        "--breaker-base-ejection",
        type=argtypes.non_negative_float,
        default=config.BREAKER_BASE_EJECTION_S,
        help="ejection time in seconds, multiplied by the number of ejections",
    )
    p.add_argument(
        "--breaker-max-ejection",
        type=argtypes.non_negative_float,
        default=config.BREAKER_MAX_EJECTION_S,
        help="longest ejection in seconds",
    )
    p.add_argument(
        "--stall-timeout",
        type=argtypes.non_negative_float,
        default=config.STALL_TIMEOUT_S,
        help="seconds without output after which an attempt is failed over (resumed) and "
        "counted against its node; the bound grows with the node's usual pace and the "
        "prompt's length (0: off)",
    )
    p.add_argument(
        "--outlier-ejection",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="eject a healthy node far slower per output token than its peers (for "
        "--breaker-base-ejection times its ejections; at most half the nodes)",
    )
    p.add_argument(
        "--flap-hold",
        type=argtypes.non_negative_float,
        default=config.FLAP_BASE_HOLD_S,
        help="a node that fails its probes again soon after re-admission is held out this "
        "many seconds, doubling with each such relapse up to --flap-max-hold (0: no damping)",
    )
    p.add_argument(
        "--flap-max-hold",
        type=argtypes.non_negative_float,
        default=config.FLAP_MAX_HOLD_S,
        help="longest hold-down of a flapping node, in seconds",
    )
    p.add_argument(
        "--forget-after",
        type=argtypes.non_negative_float,
        default=config.FORGET_AFTER_S,
        help="seconds a node may stay unreachable before it is forgotten (0: never)",
    )
    p.add_argument(
        "--readmit-after",
        type=argtypes.positive_int,
        default=config.READMIT_AFTER_PROBES,
        help="consecutive passing probes that re-admit an unhealthy node",
    )
    servers.add_process_options(p)
    security.add_options(p, security.ROLES)
    p.add_argument(
        "--log-prompts", action="store_true", help="include prompt text in request logs (off)"
    )
    return p


async def serve(args: argparse.Namespace, guard: security.ServerSecurity) -> int:
    stop = servers.stop_event_on_signals()
    metrics = CoordinatorMetrics()
    registry = assembly.monitored_registry(args, guard, metrics)
    metrics.watch_nodes(
        lambda: [
            (n.node_id, state_name(n.state), n.in_flight) for n in list(registry.nodes.values())
        ]
    )
    metrics.watch_cache(lambda: cache_counts(registry.nodes.values()))
    dispatcher, admission = assembly.data_plane(args, registry, metrics)
    coordinator = CoordinatorService(
        registry,
        dispatcher,
        strategy=args.strategy,
        health_check_interval_s=args.health_check_interval,
        admission=admission,
    )
    server = servers.new_server(guard.interceptors, args.max_message_bytes)
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(coordinator, server)
    registry_pb2_grpc.add_RegistryServicer_to_server(
        RegistryService(
            registry,
            coordinator.coordinator_id,
            require_cert_identity=guard.tls.require_client_cert,
        ),
        server,
    )
    health = servers.add_health_and_reflection(server, SERVICES)
    port = servers.bind(server, args.listen, guard.tls)
    await server.start()
    http = await start_front_door(args, coordinator, guard)
    health_only = await servers.start_health_only(health, args.health_listen)
    await servers.set_serving(health, SERVICES, True)
    serve_metrics(
        metrics.registry, args.metrics_port, args.listen.rsplit(":", 1)[0], args.metrics_port_file
    )
    servers.write_port_file(args.port_file, port)
    if http is not None:
        servers.write_port_file(args.http_port_file, http.port)
    log.info(
        "coordinator serving",
        address=servers.advertised(args.listen, port),
        **http_address(args, http.port if http is not None else None),
        strategy=args.strategy,
        health_check_interval_s=args.health_check_interval,
        max_retries=args.max_retries,
        coordinator_id=coordinator.coordinator_id,
        auth=args.auth,
        tls="mutual" if guard.tls.require_client_cert else ("on" if guard.tls.cert else "off"),
    )
    await stop.wait()
    log.info("shutting down", in_flight=dispatcher.counters.in_flight, grace_s=args.shutdown_grace)
    await servers.set_serving(health, SERVICES, False)
    # Both front doors drain at once: in-flight calls on either get the same grace.
    await asyncio.gather(
        server.stop(grace=args.shutdown_grace), *([http.stop()] if http is not None else [])
    )
    if health_only is not None:
        await health_only.stop(grace=None)
    await registry.close()
    log.info("coordinator stopped")
    return 0


def media_limit_problem(args: argparse.Namespace) -> str:
    """Why --max-media-bytes cannot work, if it cannot: a request at the limit, with the
    largest prompt, must fit what an agent receives. (It must also fit --max-message-bytes,
    checked first by gRPC: a smaller --max-message-bytes is the effective media limit.)"""
    room = config.MAX_MESSAGE_BYTES - config.REQUEST_OVERHEAD_BYTES - args.max_prompt_bytes
    if args.max_media_bytes > room:
        return (
            f"--max-media-bytes {args.max_media_bytes} with --max-prompt-bytes "
            f"{args.max_prompt_bytes} does not fit an agent's message limit of "
            f"{config.MAX_MESSAGE_BYTES} bytes (at most {room})"
        )
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, sources = settings.parse(parser, "coordinator", argv)
    if args.strategy not in STRATEGIES:
        parser.error(
            f"unknown load balancing strategy {args.strategy!r} "
            f"(known: {', '.join(sorted(STRATEGIES))})"
        )
    problem = media_limit_problem(args)
    if problem:
        parser.error(problem)
    if args.print_config:
        settings.print_config(args, sources)
        return 0
    configure_logging(args.log_format, args.log_level)
    try:
        guard = security.ServerSecurity.from_args(args, security.ROLES, outgoing_role="node")
    except security.SecurityConfigError as exc:
        parser.error(str(exc))  # exits 2 with the message
    try:
        if args.workers > 1:
            return asyncio.run(control.serve_control(args, guard))
        return asyncio.run(serve(args, guard))
    except OSError as exc:
        log.error("coordinator failed to start", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
