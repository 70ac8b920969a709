"""omni-agent: the sidecar that owns one engine and serves it to the coordinator."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from node_agent import cpus
from node_agent.coordinators import DEFAULT_RESOLVE_INTERVAL_S, Coordinators
from node_agent.engine import Engine
from node_agent.engines.sim import DEFAULT_MAX_MODEL_LEN, FAULTS, SimConfig, SimEngine
from node_agent.gpu import own_gpu
from node_agent.identity import IdentityGuard, default_node_id, new_incarnation
from node_agent.models import KNOWN as KNOWN_MODELS
from node_agent.models import ModelError
from node_agent.models import resolve as resolve_model
from node_agent.service import NodeAgentService
from omni_rpc import __version__, argtypes, config, security, servers, settings, targets
from omni_rpc.logging import configure_logging, get_logger
from omni_rpc.metrics import EngineCollector, serve_metrics
from omni_rpc.v1 import node_agent_pb2_grpc, node_pb2, registry_pb2
from omni_rpc.validation import INPUT_MODALITIES, OUTPUT_MODALITIES

log = get_logger("node_agent")

# Kubernetes' downward API, as deploy/kubernetes sets it: becomes the node's placement labels.
K8S_LABEL_ENV = {"pod": "POD_NAME", "namespace": "POD_NAMESPACE", "k8s_node": "NODE_NAME"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omni-agent", description=__doc__)
    p.add_argument(
        "--coordinator",
        help="the coordinators to join (required): HOST:PORT, a comma-separated list of them, "
        "or dns:///NAME:PORT; a name stands for every address it resolves to (IPv4 ones when "
        "it has any), as a Kubernetes headless Service has one per coordinator pod; the agent "
        "joins and serves each",
    )
    p.add_argument(
        "--coordinator-resolve-interval",
        type=argtypes.positive_float,
        default=DEFAULT_RESOLVE_INTERVAL_S,
        metavar="S",
        help="resolve the coordinators' names again every S seconds: coordinators that "
        "appear are joined, those gone are let go",
    )
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to serve on (port 0: any)")
    p.add_argument("--advertise", help="HOST:PORT the coordinator dials (default: listen address)")
    p.add_argument(
        "--node-id",
        help="node id, stable across restarts (default: HOST-gpuINDEX on a GPU, else HOST-PORT "
        "when --listen names a fixed port, else HOST-cpu; several CPU agents on one host "
        "listening on port 0 need --node-id or fixed ports: the coordinator refuses a second "
        "live holder of an id)",
    )
    p.add_argument(
        "--engine",
        choices=config.ENGINES,
        help="default: follows --model (sim for no model or `sim`, vllm for any other: "
        "simulated output never carries a real model's name unless --engine sim says so)",
    )
    p.add_argument(
        "--model",
        help="sim: a name; vllm: a model folder, a known name (smollm2-135m-instruct, prepared "
        "once by `omni model prepare`), or a hub id ORG/NAME (in the local cache, or with hub "
        "access); anything else fails at once (docs/models.md)",
    )
    p.add_argument(
        "--model-alias",
        action="append",
        default=[],
        metavar="NAME",
        help="another name requests may use for this agent's model (GenerateRequest.model); "
        "repeatable",
    )
    p.add_argument(
        "--gpu",
        type=int,
        default=-1,
        help="GPU index owned by this agent: sets CUDA_VISIBLE_DEVICES for its engine "
        "(-1: keep the environment's CUDA_VISIBLE_DEVICES)",
    )
    p.add_argument(
        "--cpu-cores",
        type=cpus.cpu_list,
        metavar="LIST",
        help="cores this agent and its engine run on, e.g. 0-3, 0,2 or 1 (default: all the "
        "process may use); vllm on CPU binds its OpenMP threads to them "
        "(VLLM_CPU_OMP_THREADS_BIND): give each agent on a host its own cores",
    )
    p.add_argument(
        "--launcher",
        choices=config.AGENT_LAUNCHERS,
        default="external",
        help="what started this agent, reported to the coordinator (omni nodes shows it)",
    )
    vllm = p.add_argument_group("vllm engine")
    vllm.add_argument(
        "--memory-buffer-gb",
        type=argtypes.non_negative_float,
        help="GPU memory left to others: gpu_memory_utilization=(total-G)/total",
    )
    vllm.add_argument("--max-model-len", type=argtypes.positive_int)
    vllm.add_argument("--max-num-seqs", type=argtypes.positive_int, default=16)
    vllm.add_argument(
        "--dtype",
        default="auto",
        help="auto, float32, bfloat16, float16 (auto: float32 on a host without CUDA, "
        "vLLM's choice with it)",
    )
    vllm.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vLLM engine argument (VALUE parsed as JSON when it can be)",
    )
    p.add_argument("--sim-ttft-ms", type=argtypes.non_negative_float, default=SimConfig.ttft_ms)
    p.add_argument("--sim-itl-ms", type=argtypes.non_negative_float, default=SimConfig.itl_ms)
    p.add_argument(
        "--sim-itl-growth",
        type=argtypes.non_negative_float,
        default=SimConfig.itl_growth,
        help="relative slow-down per additional running request",
    )
    p.add_argument(
        "--sim-max-concurrency", type=argtypes.positive_int, default=SimConfig.max_concurrency
    )
    p.add_argument(
        "--sim-max-queue",
        type=int,
        default=-1,
        help="requests that may wait for a slot; more are refused as RESOURCE_EXHAUSTED (-1: any)",
    )
    p.add_argument(
        "--sim-max-model-len",
        type=argtypes.positive_int,
        default=DEFAULT_MAX_MODEL_LEN,
        help="the simulated model's context length: prompt tokens + max_tokens beyond it are "
        "refused (INVALID_ARGUMENT)",
    )
    p.add_argument(
        "--sim-media-seconds",
        type=argtypes.non_negative_float,
        default=SimConfig.media_seconds,
        help="length of the simulated audio output (a request with modalities audio)",
    )
    p.add_argument(
        "--sim-input-modalities",
        type=modality_list(INPUT_MODALITIES),
        default=",".join(SimConfig.input_modalities),
        help="media the simulated model takes besides text, comma-separated "
        f"({', '.join(INPUT_MODALITIES)}; empty: none)",
    )
    p.add_argument(
        "--sim-output-modalities",
        type=modality_list(MEDIA_OUTPUT_MODALITIES),
        default=",".join(SimConfig.output_modalities),
        help="media the simulated model produces besides text, comma-separated "
        f"({', '.join(MEDIA_OUTPUT_MODALITIES)}; empty: none)",
    )
    p.add_argument(
        "--sim-image-size",
        type=argtypes.positive_int,
        default=SimConfig.image_size,
        help="side in pixels of the simulated image output (a request with modalities image)",
    )
    p.add_argument(
        "--sim-prefix-cache-tokens",
        type=argtypes.non_negative_int,
        default=SimConfig.prefix_cache_tokens,
        metavar="N",
        help="capacity in tokens of the simulated prefix cache, an LRU of whole blocks of "
        "prompt tokens (0: no prefix cache, nothing is ever cached)",
    )
    p.add_argument(
        "--sim-cache-block-tokens",
        type=argtypes.positive_int,
        default=SimConfig.cache_block_tokens,
        metavar="B",
        help="block size in tokens of the simulated prefix cache (a prefix is reused in whole "
        "blocks)",
    )
    p.add_argument(
        "--sim-prefill-us-per-token",
        type=argtypes.non_negative_float,
        default=SimConfig.prefill_us_per_token,
        metavar="X",
        help="microseconds of prefill each prompt token not found in the prefix cache adds to "
        "the time to first token (0: --sim-ttft-ms whatever the prompt)",
    )
    p.add_argument(
        "--sim-fault",
        choices=FAULTS,
        default="none",
        help="start with this failure mode; SIGUSR1 toggles dead, SIGUSR2 fail_requests",
    )
    p.add_argument("--max-tokens-cap", type=argtypes.positive_int, default=config.MAX_TOKENS_CAP)
    p.add_argument(
        "--shutdown-grace",
        type=argtypes.non_negative_float,
        default=config.SHUTDOWN_GRACE_S,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    p.add_argument(
        "--keepalive-time",
        type=argtypes.positive_float,
        default=config.KEEPALIVE_TIME_MS / 1000,
        metavar="S",
        help="ping each connected coordinator every S seconds (HTTP/2 keepalive): with "
        "--keepalive-timeout, bounds how long requests keep running for a coordinator that "
        "vanished without closing its connection (a partition, a frozen host)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=argtypes.positive_float,
        default=config.KEEPALIVE_TIMEOUT_MS / 1000,
        metavar="S",
        help="a ping unanswered for S seconds breaks the connection: its sessions end and "
        "their requests are aborted in the engine (after at most keepalive-time + this)",
    )
    servers.add_process_options(p)
    security.add_options(p, ["node"])
    return p


def keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Server options that make the agent ping its clients (a coordinator) every ``time_s``
    and drop a connection whose ping is not answered within ``timeout_s``: a session of a
    coordinator that vanished without closing its socket then ends, which aborts its requests.
    """
    return [
        ("grpc.keepalive_time_ms", max(1, round(time_s * 1000))),
        ("grpc.keepalive_timeout_ms", max(1, round(timeout_s * 1000))),
        # Any ping unanswered this long breaks the connection: a keepalive ping that finds
        # another ping (a BDP probe) in flight waits for that one's answer, under this
        # timeout (gRPC's default: a minute), not under keepalive_timeout.
        ("grpc.http2.ping_timeout_ms", max(1, round(timeout_s * 1000))),
        # Keep pinging while no data flows (a frozen peer's window is full: nothing is sent).
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _engine_args(pairs: list[str]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg expects KEY=VALUE, got {pair!r}")
        try:
            extra[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            extra[key.replace("-", "_")] = value
    return extra


# The media modalities a model may produce besides text.
MEDIA_OUTPUT_MODALITIES = tuple(m for m in OUTPUT_MODALITIES if m != "text")


def modality_list(known: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: comma-separated modalities out of ``known`` ("" : none)."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown modality {unknown[0]!r} (known: {', '.join(known)})"
            )
        return names

    return parse


def build_engine(args: argparse.Namespace) -> Engine:
    if args.engine == "vllm":
        if not args.model:
            raise ModelError("--engine vllm needs --model")
        from node_agent.engines.vllm import VllmConfig, VllmEngine

        return VllmEngine(
            VllmConfig(
                model=resolve_model(args.model),
                served_name=args.model if args.model in KNOWN_MODELS else "",
                max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs,
                dtype=args.dtype,
                memory_buffer_gb=args.memory_buffer_gb,
                cpu_cores=args.cpu_cores or (),
                extra=_engine_args(args.engine_arg),
            )
        )
    return SimEngine(
        SimConfig(
            ttft_ms=args.sim_ttft_ms,
            itl_ms=args.sim_itl_ms,
            itl_growth=args.sim_itl_growth,
            max_concurrency=args.sim_max_concurrency,
            max_queue=None if args.sim_max_queue < 0 else args.sim_max_queue,
            model=args.model or "sim",
            max_model_len=args.sim_max_model_len,
            media_seconds=args.sim_media_seconds,
            image_size=args.sim_image_size,
            input_modalities=args.sim_input_modalities,
            output_modalities=args.sim_output_modalities,
            prefix_cache_tokens=args.sim_prefix_cache_tokens,
            cache_block_tokens=args.sim_cache_block_tokens,
            prefill_us_per_token=args.sim_prefill_us_per_token,
        )
    )


def _install_fault_signals(engine: Engine) -> None:
    """SIGUSR1 toggles the engine's "dead" mode, SIGUSR2 its "fail_requests" mode."""
    loop = asyncio.get_running_loop()

    def toggle(mode: str) -> None:
        engine.set_fault("none" if engine.fault == mode else mode)
        log.warning("fault injection", fault=engine.fault)

    loop.add_signal_handler(signal.SIGUSR1, toggle, "dead")
    loop.add_signal_handler(signal.SIGUSR2, toggle, "fail_requests")


def placement(launcher: str, labels: dict[str, str] | None = None) -> node_pb2.Placement:
    found = dict(labels or {})
    # Set by NVIDIA's device plugin and container toolkit (a GPU UUID or index): which
    # physical GPU this is, where CUDA_VISIBLE_DEVICES only says "0".
    if os.environ.get("NVIDIA_VISIBLE_DEVICES") not in (None, "", "all", "void", "none"):
        found.setdefault("nvidia_visible_devices", os.environ["NVIDIA_VISIBLE_DEVICES"])
    for label, variable in K8S_LABEL_ENV.items():
        if os.environ.get(variable):
            found.setdefault(label, os.environ[variable])
    return node_pb2.Placement(launcher=launcher, host=socket.gethostname(), labels=found)


async def serve(
    args: argparse.Namespace,
    stop: asyncio.Event | None = None,
    labels: dict[str, str] | None = None,
    on_serving: Callable[[str], None] | None = None,
) -> int:
    """Run the agent until ``stop`` is set (default: until SIGTERM/SIGINT).

    ``stop``, ``labels`` and ``on_serving`` (called with the advertised address) let a host
    process embed the agent, as the Ray actor does, off the main thread.
    """
    embedded = stop is not None
    # Checked before the engine loads (minutes for vLLM): bad security options fail at once.
    guard = security.ServerSecurity.from_args(args, ["node"], outgoing_role="node")
    stop = stop or servers.stop_event_on_signals()
    gpu = own_gpu(args.gpu)
    if args.cpu_cores:
        # Before the engine starts: its processes and threads inherit the binding.
        cpus.pin(cpus.check(args.cpu_cores))
    engine = build_engine(args)
    if engine.faults:
        engine.set_fault(args.sim_fault)
    # The engine starts before any gRPC object exists: vLLM forks its engine core, and forking
    # a process whose gRPC threads are running can abort the child in gRPC's fork handlers.
    try:
        await engine.start()
    except Exception as exc:  # a model that will not load: say so plainly, exit non-zero
        log.error(
            "engine failed to start", engine=engine.kind, error=f"{type(exc).__name__}: {exc}"
        )
        return 1
    node_id = args.node_id or default_node_id(socket.gethostname(), gpu.index, args.listen)
    # New on every start: the coordinator tells this process from an earlier one by it.
    incarnation = new_incarnation()
    server = servers.new_server(
        [*guard.interceptors, IdentityGuard(node_id, incarnation)],
        options=keepalive_options(args.keepalive_time, args.keepalive_timeout),
    )
    port = servers.bind(server, args.listen, guard.tls)
    if not embedded:
        configure_logging(args.log_format, args.log_level, node_id=node_id)
    address = args.advertise or servers.advertised(args.listen, port)
    service = NodeAgentService(engine, node_id, args.max_tokens_cap)
    node_agent_pb2_grpc.add_NodeAgentServicer_to_server(service, server)
    health = servers.add_health_and_reflection(server, [config.NODE_AGENT_SERVICE])
    await servers.set_serving(health, [config.NODE_AGENT_SERVICE], engine.is_healthy())

    # The engine reports health changes synchronously; the health service is async.
    pending: set[asyncio.Task[None]] = set()

    def on_engine_health(healthy: bool) -> None:
        serving = healthy and not service.draining
        task = asyncio.create_task(
            servers.set_serving(health, [config.NODE_AGENT_SERVICE], serving)
        )
        pending.add(task)
        task.add_done_callback(pending.discard)
        log.info("engine health changed", healthy=healthy)

    engine.add_health_listener(on_engine_health)
    if engine.faults and not embedded:
        _install_fault_signals(engine)
    await server.start()
    health_only = await servers.start_health_only(health, args.health_listen)
    metrics = CollectorRegistry()
    metrics.register(EngineCollector(engine.load, lambda: service.in_flight))
    serve_metrics(metrics, args.metrics_port, args.listen.rsplit(":", 1)[0], args.metrics_port_file)
    servers.write_port_file(args.port_file, port)
    log.info(
        "agent serving",
        node_id=node_id,
        incarnation=incarnation,
        address=address,
        engine=engine.kind,
        model=engine.model,
        launcher=args.launcher,
        visible_devices=gpu.visible_devices,
    )
    if on_serving is not None:
        on_serving(address)

    coordinators = Coordinators(
        args.coordinator,
        registry_pb2.JoinRequest(
            node_id=node_id,
            address=address,
            model=engine.model,
            engine=engine.kind,
            capacity=engine.capacity,
            gpu=gpu,
            version=__version__,
            placement=placement(args.launcher, labels),
            incarnation=incarnation,
            model_aliases=args.model_alias,
            input_modalities=engine.input_modalities,
            output_modalities=engine.output_modalities,
            cache_block_tokens=engine.cache_block_tokens,
            cache_capacity_tokens=engine.cache_capacity_tokens,
        ),
        guard.outgoing,
        args.coordinator_resolve_interval,
    )
    join_task = asyncio.create_task(coordinators.run())
    await stop.wait()

    # Drain: refuse new work, let in-flight requests finish, then leave and stop.
    log.info("shutting down: draining", in_flight=service.in_flight)
    service.draining = True
    await servers.set_serving(health, [config.NODE_AGENT_SERVICE], False)
    idle = await service.wait_idle(args.shutdown_grace)
    if not idle:
        log.warning("grace period over, aborting in-flight requests", in_flight=service.in_flight)
    join_task.cancel()
    await coordinators.leave("agent shutting down")
    await server.stop(grace=1.0)
    if health_only is not None:
        await health_only.stop(grace=None)
    await engine.stop()
    await coordinators.close()
    log.info("agent stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, sources = settings.parse(parser, "agent", argv)
    args.engine = args.engine or config.engine_for(args.model)
    if not args.coordinator:
        variable = settings.env_name("coordinator")
        parser.error(
            f"the coordinator address is required: --coordinator, {variable}"
            " or coordinator in the [agent] table of --config"
        )
    try:
        targets.parse_targets(args.coordinator)
    except ValueError as exc:
        parser.error(str(exc))
    if args.print_config:
        settings.print_config(args, sources)
        return 0
    configure_logging(args.log_format, args.log_level)
    try:
        return asyncio.run(serve(args))
    except (ModelError, ValueError) as exc:
        log.error("agent failed to start", error=str(exc))
        parser.error(str(exc))  # exits 2 with the message
    except OSError as exc:
        log.error("agent failed to start", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
