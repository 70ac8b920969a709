"""omni: run a local cluster, look at it, and send it prompts.

omni up --nodes 3                 coordinator + 3 agents in the foreground (Ctrl-C stops)
omni up --nodes 3 --coordinators 2
                                  2 coordinators, each of the 3 agents joins both
omni status [--json]              node table and request totals
omni top [--interval S]           live view of nodes, load and tokens/s
omni nodes [--json]               node table only
omni generate "PROMPT"            stream one completion to stdout
omni chat "MESSAGE" [--system S]  stream a chat reply to stdout (the model's chat template)
omni drain NODE [--wait]          stop new dispatch to NODE (--wait: until nothing is in flight)
omni undrain NODE                 re-admit a drained node
omni model prepare NAME           build a known model's folder once; print its path
omni model list                   the known model names
omni config show coordinator|agent [OPTIONS]
                                  effective configuration (flags, OMNI_* env, --config file)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import grpc

from coordinator.strategies import STRATEGIES
from node_agent import models
from omni_rpc import __version__, argtypes, config, launchers, security, targets
from omni_rpc.cli.top import add_arguments as add_top_arguments
from omni_rpc.launchers import ray_actors
from omni_rpc.launchers.cpus import CPU_MODES
from omni_rpc.launchers.gpus import PlacementError
from omni_rpc.launchers.local import LaunchError, LocalCluster
from omni_rpc.sdk import build_chat_request, build_request
from omni_rpc.sdk.client import (
    CoordinatorClient,
    CoordinatorUnreachable,
    node_dict,
    state_name,
    stats_dict,
)
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2

DEFAULT_COORDINATOR = "127.0.0.1:50051"
DETAIL_WIDTH = 60
DRAIN_POLL_INTERVAL_S = 0.2
# `omni up`: how often it looks at the nodes while they load, and how often it says that a
# node is still loading (with the last line of its log).
UP_POLL_INTERVAL_S = 0.1
UP_STILL_LOADING_EVERY_S = 15.0


def _default_coordinator() -> str:
    return os.environ.get("OMNI_COORDINATOR") or DEFAULT_COORDINATOR


# -- parser --------------------------------------------------------------------------------


def _add_coordinator_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        type=argtypes.coordinators,
        default=_default_coordinator(),
        help="the coordinator: HOST:PORT, several (a:1,b:2: each call goes to one that "
        "answers) or dns:///NAME:PORT (default: $OMNI_COORDINATOR or %(default)s)",
    )
    p.add_argument(
        "--token-file",
        default=os.environ.get("OMNI_TOKEN_FILE"),
        help="bearer token for the coordinator (default: $OMNI_TOKEN_FILE, or $OMNI_TOKEN)",
    )
    p.add_argument("--tls-ca", default=os.environ.get("OMNI_TLS_CA"), help="CA to verify it by")
    p.add_argument("--tls-cert", default=os.environ.get("OMNI_TLS_CERT"), help="client cert")
    p.add_argument("--tls-key", default=os.environ.get("OMNI_TLS_KEY"), help="its key")


def client_security(args: argparse.Namespace) -> ChannelSecurity:
    """The token and TLS files a client command dials the coordinator with."""
    try:
        return security.client_security(args)
    except security.SecurityConfigError as exc:
        raise SystemExit(f"omni: {exc}") from None


def _client(args: argparse.Namespace) -> CoordinatorClient:
    return CoordinatorClient(args.coordinator, security=client_security(args))


def _chat_turn(text: str) -> tuple[str, str]:
    """``--message ROLE:TEXT``: the role before the first colon, the text after it."""
    role, sep, content = text.partition(":")
    role = role.strip()
    if not sep or not role or " " in role:
        raise argparse.ArgumentTypeError(f"expected ROLE:TEXT like user:Hi, got {text!r}")
    return role, content


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    """What `omni generate` and `omni chat` share: the model, sampling and reporting."""
    p.add_argument("--model", help="the model to serve it (default: the cluster's one model)")
    p.add_argument("--max-tokens", type=argtypes.positive_int, default=config.DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument(
        "--timeout",
        type=argtypes.positive_float,
        default=60.0,
        metavar="S",
        help="deadline of the whole request (default: %(default)s)",
    )
    p.add_argument(
        "-v", "--verbose", action="store_true", help="report node, attempt and usage on stderr"
    )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }


def _workers(text: str) -> str:
    """``omni up --workers``: passed to the coordinator as given, checked here first."""
    return text if text == "auto" else str(argtypes.positive_int(text))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"omni-rpc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start a coordinator and N agents (foreground)")
    up.add_argument("--nodes", type=argtypes.positive_int, required=True, help="number of agents")
    up.add_argument(
        "--engine",
        choices=config.ENGINES,
        help="the agents' engine (default: follows --model: vllm for a model, sim for the "
        "model 'sim' or none; --engine sim serves simulated output under any model name)",
    )
    up.add_argument(
        "--model",
        help="model served by every agent: a folder, a hub id or a known name (vllm), or "
        "'sim' (simulated); default: sim, or smollm2-135m-instruct with --engine vllm",
    )
    up.add_argument("--strategy", choices=sorted(STRATEGIES), default=config.DEFAULT_STRATEGY)
    up.add_argument(
        "--health-check-interval",
        type=argtypes.positive_float,
        default=config.DEFAULT_HEALTH_CHECK_INTERVAL_S,
        metavar="S",
    )
    up.add_argument(
        "--max-retries", type=argtypes.non_negative_int, default=config.DEFAULT_MAX_RETRIES
    )
    up.add_argument(
        "--workers",
        type=_workers,
        default=str(config.DEFAULT_COORDINATOR_WORKERS),
        metavar="N",
        help="the coordinator's processes serving Generate (auto: one per core; above 1, plus "
        "a control process) (default: %(default)s)",
    )
    up.add_argument(
        "--listen",
        type=argtypes.host_port,
        default=DEFAULT_COORDINATOR,
        help="coordinator HOST:PORT (default: %(default)s); with --coordinators N on a fixed "
        "port P, coordinator i listens on P+i",
    )
    up.add_argument(
        "--coordinators",
        type=argtypes.positive_int,
        default=1,
        metavar="N",
        help="start N coordinators, each with its own registry; every agent joins all of them "
        "and clients may use any (default: %(default)s)",
    )
    up.add_argument(
        "--http-listen",
        type=argtypes.host_port,
        metavar="HOST:PORT",
        help="serve the coordinator's HTTP front door (OpenAI-compatible, /v1) here too "
        "(port 0: any free port; with --coordinators N on a fixed port P, coordinator i's is "
        "on P+i; default: none)",
    )
    up.add_argument(
        "--log-dir",
        type=Path,
        help="where the processes' logs go (default: a new temporary directory, kept after exit)",
    )
    up.add_argument(
        "--startup-timeout",
        type=argtypes.positive_float,
        metavar="S",
        help="seconds to wait for every node to become healthy (default: 60 sim, 600 vllm)",
    )
    up.add_argument(
        "--sim-ttft-ms",
        type=argtypes.non_negative_float,
        metavar="X",
        help="simulated time to first token",
    )
    up.add_argument(
        "--sim-itl-ms",
        type=argtypes.non_negative_float,
        metavar="Y",
        help="simulated inter-token latency",
    )
    engine_options = up.add_argument_group("vllm engine (passed to every agent)")
    engine_options.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    engine_options.add_argument("--max-model-len", type=argtypes.positive_int, metavar="N")
    engine_options.add_argument("--max-num-seqs", type=argtypes.positive_int, metavar="N")
    engine_options.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vLLM engine argument (VALUE parsed as JSON when it can be); repeatable",
    )
    up.add_argument(
        "--auth",
        choices=("auto", "on", "off"),
        default="auto",
        help="make tokens for every role and require them (auto: on unless the coordinator "
        "listens on loopback only, as by default)",
    )
    placement = up.add_argument_group("placement")
    placement.add_argument(
        "--gpus",
        default="auto",
        help="local agents' GPUs: auto (vllm: one agent per GPU; sim: none), all, none, "
        "or indices like 0,1,3 (default: auto)",
    )
    placement.add_argument(
        "--cpu-cores",
        choices=CPU_MODES,
        default="auto",
        help="local vLLM agents without GPUs: auto gives each its own share of the cores "
        "(--cpu-cores on each agent), none leaves vLLM's own binding (default: auto)",
    )
    placement.add_argument(
        "--launcher",
        choices=config.LAUNCHERS,
        help="who starts the agents: child processes, or Ray actors "
        "(default: ray with --ray-address, else local)",
    )
    placement.add_argument(
        "--ray-address",
        help="Ray cluster to place agents on: auto, HOST:PORT or ray://HOST:10001 "
        "(with --launcher ray and no address: a local Ray instance)",
    )
    placement.add_argument(
        "--ray-resources",
        type=_resources,
        default=None,
        metavar="JSON",
        help='Ray resources per agent (default: {"GPU": 1, "CPU": 1}; CPU-only simulated '
        'agents: {"CPU": 1})',
    )
    up.set_defaults(func=cmd_up)

    status = commands.add_parser("status", help="show the nodes and request totals")
    _add_coordinator_option(status)
    status.add_argument("--json", action="store_true", help="print get_stats() as JSON")
    status.set_defaults(func=cmd_status)

    top = commands.add_parser("top", help="live view of nodes, load and tokens/s (Ctrl-C quits)")
    _add_coordinator_option(top)
    add_top_arguments(top)

    generate = commands.add_parser("generate", help="stream one completion to stdout")
    generate.add_argument("prompt")
    _add_coordinator_option(generate)
    _add_sampling_options(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser(
        "chat",
        help="stream a chat reply to stdout (rendered with the model's chat template)",
        description="Send a chat and stream the assistant's reply. Turns, in order: --system, "
        "each --message, then MESSAGE as the user's last turn.",
    )
    chat.add_argument("message", nargs="?", help="the user's message (the last turn)")
    chat.add_argument("--system", help="a system turn first")
    chat.add_argument(
        "--message",
        dest="messages",
        action="append",
        default=[],
        type=_chat_turn,
        metavar="ROLE:TEXT",
        help="a turn, e.g. user:Hi or assistant:Hello! (repeatable, in order)",
    )
    _add_coordinator_option(chat)
    _add_sampling_options(chat)
    chat.set_defaults(func=cmd_chat)

    nodes = commands.add_parser("nodes", help="show the node table")
    _add_coordinator_option(nodes)
    nodes.add_argument("--json", action="store_true", help="print the nodes as a JSON list")
    nodes.set_defaults(func=cmd_nodes)

    drain = commands.add_parser(
        "drain", help="stop new dispatch to a node (on every coordinator --coordinator names)"
    )
    drain.add_argument("node", metavar="NODE", help="node id (see `omni nodes`)")
    _add_coordinator_option(drain)
    drain.add_argument(
        "--wait", action="store_true", help="wait until no request is left on the node"
    )
    drain.add_argument(
        "--timeout",
        type=argtypes.positive_float,
        default=300.0,
        metavar="S",
        help="with --wait: give up (exit 1) after S seconds (default: %(default)s)",
    )
    drain.set_defaults(func=cmd_drain)

    undrain = commands.add_parser(
        "undrain", help="re-admit a drained node (on every coordinator --coordinator names)"
    )
    undrain.add_argument("node", metavar="NODE", help="node id (see `omni nodes`)")
    _add_coordinator_option(undrain)
    undrain.set_defaults(func=cmd_undrain)

    model = commands.add_parser("model", help="prepare and list known models")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    prepare = model_commands.add_parser("prepare", help="build a known model's folder (once)")
    prepare.add_argument("name", help=f"one of: {', '.join(sorted(models.KNOWN))}")
    prepare.set_defaults(func=cmd_model_prepare)
    listing = model_commands.add_parser("list", help="the known model names and their folders")
    listing.set_defaults(func=cmd_model_list)

    cfg = commands.add_parser("config", help="show the effective configuration of a server")
    cfg_commands = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = cfg_commands.add_parser(
        "show", help="each option's value and where it came from (flag, env, file, default)"
    )
    show.add_argument("component", choices=sorted(COMPONENT_MODULES))
    show.add_argument("options", nargs=argparse.REMAINDER, help="the server's own options")
    show.set_defaults(func=cmd_config_show)
    return parser


# -- omni up -------------------------------------------------------------------------------


class _Shutdown(Exception):
    """Raised in the main thread by SIGINT/SIGTERM so start-up and waiting both unwind."""


def _raise_shutdown(signum: int, frame: FrameType | None) -> NoReturn:
    raise _Shutdown(signal.Signals(signum).name)


def _install_signal_handlers(handler: Callable[[int, FrameType | None], Any]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def _auth_wanted(mode: str, on_ray: bool, listen: str) -> bool:
    if mode != "auto":
        return mode == "on"
    host = listen.rsplit(":", 1)[0].strip("[]")
    return on_ray or host not in ("127.0.0.1", "localhost", "::1")


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if (
        not isinstance(value, dict)
        or not value
        or not all(isinstance(v, int | float) and v >= 0 for v in value.values())
    ):
        raise argparse.ArgumentTypeError(f'expected an object like {{"GPU": 1}}, got {text!r}')
    return {str(k): float(v) for k, v in value.items()}


def _coordinators(cluster: LocalCluster) -> list[Any]:
    if cluster.coordinators:
        return list(cluster.coordinators)
    return [cluster.coordinator] if cluster.coordinator is not None else []


def _children(cluster: LocalCluster) -> list[Any]:
    return [*_coordinators(cluster), *cluster.agents]


def _say(text: str) -> None:
    print(text, flush=True)


def _print_coordinator(cluster: LocalCluster) -> None:
    """What `omni up` says as soon as the coordinators listen, before any node is ready."""
    for address in cluster.coordinator_addresses or [cluster.coordinator_address]:
        _say(f"coordinator  {address} (gRPC)")
    if len(cluster.coordinator_addresses) > 1:
        target = cluster.coordinator_target
        _say(f"clients      omni --coordinator {target} ... (or OMNI_COORDINATOR={target})")
    for url in [u for u in cluster.http_urls if u] or [cluster.http_url]:
        if url:
            _say(f"http         {url} (OpenAI-compatible; base_url for openai clients)")
    _say(f"logs         {cluster.log_dir}")
    if cluster.tokens:
        files = ", ".join(f"{r} {cluster.token_file(r)}" for r in sorted(cluster.tokens))
        _say(f"tokens       {files} (omni --token-file PATH ...)")


def _print_agents_starting(cluster: LocalCluster) -> None:
    for index, agent in enumerate(cluster.agents):
        cores = cluster.agent_cores
        where = f", cores {cores[index]}" if index < len(cores) else ""
        _say(f"{agent.name}: starting (pid {agent.process.pid}{where})")


class _Progress:
    """`omni up`'s lines while the nodes load: each node's loading, its last log line every
    UP_STILL_LOADING_EVERY_S, and when it is ready (healthy at the coordinator)."""

    def __init__(self, cluster: LocalCluster, model: str, count: int) -> None:
        self.cluster = cluster
        self.model = model
        self.count = count
        self.started = time.monotonic()
        self.ready: set[str] = set()
        self.loading: dict[str, float] = {}  # node -> when "still loading" was last said

    def announce_loading(self) -> None:
        for agent in self.cluster.agents:
            self.loading[agent.name] = time.monotonic()
            _say(f"{agent.name}: loading model {self.model} (logs: {agent.log_path})")

    def update(self, states: dict[str, str]) -> None:
        elapsed = time.monotonic() - self.started
        for node_id, state in sorted(states.items()):
            if state == "healthy" and node_id not in self.ready:
                self.ready.add(node_id)
                self.loading.pop(node_id, None)
                _say(f"{node_id}: ready after {elapsed:.1f} s")
        now = time.monotonic()
        for agent in self.cluster.agents:
            said = self.loading.get(agent.name)
            if said is None or now - said < UP_STILL_LOADING_EVERY_S:
                continue
            self.loading[agent.name] = now
            state = states.get(agent.name, "not joined yet")
            last = agent.last_event() or "no log line yet"
            _say(f"{agent.name}: still loading after {elapsed:.0f} s ({state}): {last[:100]}")


def _merged_states(per_coordinator: Sequence[dict[str, str]]) -> dict[str, str]:
    """Each node's state across the coordinators: healthy where every coordinator says so,
    else what the first that does not says ("not joined yet" where one does not know it)."""
    merged: dict[str, str] = {}
    for node_id in sorted({n for states in per_coordinator for n in states}):
        other = [s.get(node_id, "not joined yet") for s in per_coordinator]
        merged[node_id] = next((state for state in other if state != "healthy"), "healthy")
    return merged


def _wait_healthy(cluster: LocalCluster, progress: _Progress, timeout_s: float) -> None:
    """Until ``progress.count`` nodes are healthy (at every coordinator), saying what each
    does meanwhile."""
    clients = [
        CoordinatorClient(address, timeout_s=2.0, security=cluster.client_security())
        for address in cluster.coordinator_addresses or [cluster.coordinator_address]
    ]
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            cluster.check_alive()
            per_coordinator: list[dict[str, str]] = []
            for client in clients:
                try:
                    nodes = client.nodes()
                except CoordinatorUnreachable:
                    nodes = []  # just started; the next poll will tell
                per_coordinator.append({n.node_id: state_name(n.state) for n in nodes})
            states = _merged_states(per_coordinator)
            progress.update(states)
            if len(progress.ready) >= progress.count:
                return
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"only {len(progress.ready)}/{progress.count} nodes healthy after "
                    f"{timeout_s:.0f}s (logs in {cluster.log_dir})"
                )
            time.sleep(UP_POLL_INTERVAL_S)
    finally:
        for client in clients:
            client.close()


def _print_cluster(cluster: LocalCluster) -> None:
    client = CoordinatorClient(cluster.coordinator_address, security=cluster.client_security())
    try:
        nodes = {n.node_id: n for n in client.nodes()}
    finally:
        client.close()
    for node_id, node in sorted(nodes.items()):
        where = node_dict(node)
        gpu = f"gpu {where['visible_devices']}" if where["visible_devices"] else "cpu"
        pid = where["placement_labels"].get("pid") or next(
            (str(c.process.pid) for c in cluster.agents if c.name == node_id), "?"
        )
        print(f"  {node_id:<12} {node.address:<22} {where['launcher']:<6} {gpu:<8} pid {pid}")
    count = len(cluster.coordinator_addresses)
    at = f" at each of {count} coordinators" if count > 1 else ""
    _say(f"{len(nodes)} nodes healthy{at}. Press Ctrl-C to stop.")


def _watch(cluster: LocalCluster) -> int:
    """Sleep until a signal arrives; report children that die meanwhile."""
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        for child in _children(cluster):
            if child.alive or child.name in reported:
                continue
            reported.add(child.name)
            print(
                f"omni: {child.name} exited with code {child.process.returncode}:\n"
                f"{child.log_tail()}",
                file=sys.stderr,
                flush=True,
            )
            coordinators = _coordinators(cluster)
            if child in coordinators and not any(c.alive for c in coordinators):
                return 1  # nothing left to serve requests


def _stop(cluster: LocalCluster) -> None:
    def kill_now(signum: int, frame: FrameType | None) -> None:
        # A second Ctrl-C while stopping: don't make the user wait for grace periods.
        for child in _children(cluster):
            if child.alive:
                child.process.kill()

    _install_signal_handlers(kill_now)
    cluster.stop()


def _agent_engine_args(args: argparse.Namespace) -> list[str]:
    """`omni up`'s options that every agent takes as they are."""
    agent_args: list[str] = []
    for flag, value in (
        ("--sim-ttft-ms", args.sim_ttft_ms),
        ("--sim-itl-ms", args.sim_itl_ms),
        ("--dtype", args.dtype),
        ("--max-model-len", args.max_model_len),
        ("--max-num-seqs", args.max_num_seqs),
    ):
        if value is not None:
            agent_args += [flag, str(value)]
    for pair in args.engine_arg:
        agent_args += ["--engine-arg", pair]
    return agent_args


def cmd_up(args: argparse.Namespace) -> int:
    for pair in args.engine_arg:
        key, sep, _ = pair.partition("=")
        if not sep or not key:
            print(f"omni: --engine-arg expects KEY=VALUE, got {pair!r}", file=sys.stderr)
            return 2
    engine, model = launchers.resolve_engine(args.engine, args.model)
    launcher = args.launcher or ("ray" if args.ray_address else "local")
    plan = launchers.ClusterPlan(
        num_nodes=args.nodes,
        strategy=args.strategy,
        health_check_interval=args.health_check_interval,
        max_retries=args.max_retries,
        engine=engine,
        model=model,
        launcher=launcher,
        agent_args=_agent_engine_args(args),
        coordinator_args=["--workers", args.workers],
        listen=args.listen,
        coordinators=args.coordinators,
        http_listen=args.http_listen,
        cpu_cores=args.cpu_cores,
        log_dir=args.log_dir,
        auth=_auth_wanted(args.auth, launcher == "ray", args.listen),
        gpus=args.gpus,
        ray_address=args.ray_address,
        ray_resources=args.ray_resources or dict(ray_actors.DEFAULT_RESOURCES),
    )
    try:
        planned = launchers.plan_cluster(plan)
    except (PlacementError, LaunchError) as exc:
        print(f"omni: {exc}", file=sys.stderr)
        return 2
    cluster = planned.processes
    progress = _Progress(cluster, model, args.nodes)

    def coordinator_listens(started: LocalCluster) -> None:
        _print_coordinator(started)
        if planned.ray_agents is not None:
            _say(f"placing {args.nodes} agents on Ray ({args.ray_address or 'local'}) ...")

    # Installed before anything starts, so a signal during start-up still stops every child.
    _install_signal_handlers(_raise_shutdown)
    code = 0
    startup_timeout = args.startup_timeout or config.STARTUP_TIMEOUT_S[engine]
    try:
        planned.start(startup_timeout, coordinator_listens)
        if planned.ray_agents is None:
            _print_agents_starting(cluster)
            progress.announce_loading()
        _wait_healthy(cluster, progress, startup_timeout)
        _print_cluster(cluster)
        code = _watch(cluster)
    except _Shutdown as stop:
        print(f"\nomni: {stop} received, stopping the cluster", file=sys.stderr, flush=True)
    except PlacementError as exc:
        print(f"omni: {exc}", file=sys.stderr, flush=True)
        code = 2
    except LaunchError as exc:
        print(f"omni: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if planned.ray_agents is not None:
            planned.ray_agents.close()
        _stop(cluster)
    if code == 0:
        print(f"omni: stopped (logs in {cluster.log_dir})", file=sys.stderr)
    return code


# -- omni status ---------------------------------------------------------------------------


def _truncate(text: str, width: int) -> str:
    text = " ".join(text.split())  # errors can be multi-line
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)


def _age(then: float, now: float) -> str:
    """``2.1s ago``, ``3m ago``; ``-`` for a time never set (0)."""
    if then <= 0:
        return "-"
    age = max(0.0, now - then)  # the coordinator's clock may be a little ahead of ours
    if age < 60:
        return f"{age:.1f}s ago"
    if age < 3600:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


NODE_HEADER = (
    "NODE",
    "STATE",
    "ADDRESS",
    "IN_FLIGHT",
    "RUN/WAIT",
    "SERVED",
    "FAILURES",
    "CONSEC",
    "EJECTIONS",
    "PROBED",
    "PROBE_MS",
)


def _node_row(node: dict[str, Any], now: float) -> tuple[str, ...]:
    probed = node["last_health_check_at"] > 0
    return (
        node["node_id"],
        node["state"],
        node["address"],
        str(node["in_flight"]),
        f"{node['load']['running']}/{node['load']['waiting']}",
        str(node["served"]),
        str(node["failures"]),
        str(node["consecutive_failures"]),
        str(node["ejections"]),
        _age(node["last_health_check_at"], now),
        f"{node['health_check_latency_ms']:.1f}" if probed else "-",
    )


def _node_details(node: dict[str, Any], now: float) -> list[str]:
    """The indented lines under a node's row: why it is in its state, its last error."""
    details = []
    if node["state_reason"]:
        details.append(f"reason: {_truncate(node['state_reason'], DETAIL_WIDTH)}")
    if node["ejected_until"] > now:
        details.append(f"ejected for another {node['ejected_until'] - now:.1f}s")
    if node["last_error"]:
        details.append(f"last error: {_truncate(node['last_error'], DETAIL_WIDTH)}")
    if node.get("launcher") not in (None, "", "local") or node.get("visible_devices"):
        gpu = f", GPU {node['visible_devices']}" if node.get("visible_devices") else ""
        details.append(f"placed by {node['launcher'] or 'unknown'} on {node['host']}{gpu}")
    return details


def format_nodes(nodes: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """The node table: one row per ``node_dict(...)``, details indented under it."""
    if not nodes:
        return "(no nodes have joined)"
    now = time.time() if now is None else now
    rows = [_node_row(node, now) for node in nodes]
    lines = _table(NODE_HEADER, rows).splitlines()
    out = [lines[0]]
    for node, line in zip(nodes, lines[1:], strict=True):
        out.append(line)
        out.extend(f"    {detail}" for detail in _node_details(node, now))
    return "\n".join(out)


def format_status(stats: dict[str, Any], now: float | None = None) -> str:
    """The human view of ``stats_dict(...)``: the node table and a summary line."""
    # The coordinator counts draining nodes as healthy; say how many take no new work.
    draining = sum(1 for node in stats["health_stats"].values() if node["state"] == "draining")
    summary = (
        f"{len(stats['healthy_nodes'])}/{stats['num_nodes']} nodes healthy"
        f"{f' ({draining} draining)' if draining else ''}, "
        f"strategy {stats['strategy']}, requests: {stats['requests_total']} total, "
        f"{stats['requests_succeeded']} succeeded, {stats['requests_failed']} failed, "
        f"{stats.get('requests_cancelled', 0)} cancelled, "
        f"{stats['retries_total']} retries, {stats['resumes_total']} resumed"
    )
    table = format_nodes(list(stats["health_stats"].values()), now)
    return f"{table}\n\n{summary}\n{format_models(stats)}"


def format_models(stats: dict[str, Any]) -> str:
    """Each model the nodes serve, with its healthy nodes out of all (and its aliases, and the
    modalities its nodes take and produce when any takes or produces media)."""
    models: dict[str, list[dict[str, Any]]] = {}
    for node in stats["health_stats"].values():
        models.setdefault(node.get("model", ""), []).append(node)
    parts = []
    for model, nodes in sorted(models.items()):
        healthy = sum(1 for n in nodes if n["state"] == "healthy")
        aliases = sorted({a for n in nodes for a in n.get("model_aliases", [])} - {model})
        also = f" (also {', '.join(aliases)})" if aliases else ""
        takes = sorted({m for n in nodes for m in n.get("input_modalities", [])})
        makes = sorted({m for n in nodes for m in n.get("output_modalities", [])})
        media = (
            f" [in: {', '.join(['text', *takes])}; out: {', '.join(['text', *makes])}]"
            if takes or makes
            else ""
        )
        parts.append(f"{model or '-'}{also}{media} {healthy}/{len(nodes)} healthy")
    return "models: " + ("; ".join(parts) if parts else "none")


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        stats = stats_dict(client.stats())
    finally:
        client.close()
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_status(stats))
    return 0


# -- omni nodes ----------------------------------------------------------------------------


def cmd_nodes(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        nodes = [node_dict(n) for n in client.nodes()]
    finally:
        client.close()
    nodes.sort(key=lambda n: str(n["node_id"]))
    if args.json:
        print(json.dumps(nodes, indent=2, sort_keys=True))
    else:
        print(format_nodes(nodes))
    return 0


# -- omni drain / undrain ------------------------------------------------------------------


def _describe(node: dict[str, Any]) -> str:
    reason = f" ({node['state_reason']})" if node["state_reason"] else ""
    return f"{node['node_id']}: {node['state']}{reason}"


def _wait_drained(client: CoordinatorClient, node_id: str, timeout_s: float) -> int:
    """Poll ListNodes (no side effects, unlike DrainNode) until nothing is left on the node."""
    deadline = time.monotonic() + timeout_s
    reported: int | None = None
    while True:
        node = next((node_dict(n) for n in client.nodes() if n.node_id == node_id), None)
        if node is None or node["state"] == "left":
            print(f"{node_id}: left the cluster; nothing in flight", flush=True)
            return 0
        if node["state"] != "draining":
            print(f"omni: {node_id} is no longer draining ({_describe(node)})", file=sys.stderr)
            return 1
        in_flight = node["in_flight"]
        if in_flight == 0:
            print(f"{node_id}: drained, no requests in flight", flush=True)
            return 0
        if in_flight != reported:
            print(f"{node_id}: waiting for {in_flight} in flight", flush=True)
            reported = in_flight
        if time.monotonic() > deadline:
            print(
                f"omni: {node_id} still has {in_flight} request(s) in flight after {timeout_s:g}s",
                file=sys.stderr,
            )
            return 1
        time.sleep(DRAIN_POLL_INTERVAL_S)


def _each_coordinator(args: argparse.Namespace) -> list[tuple[str, CoordinatorClient]]:
    """A client per coordinator: a drain must reach every one (each has its own registry)."""
    security = client_security(args)
    try:
        addresses = targets.every_coordinator(args.coordinator)
    except OSError as exc:
        raise CoordinatorUnreachable(args.coordinator, f"does not resolve: {exc}") from None
    return [(a, CoordinatorClient(a, security=security)) for a in addresses]


def cmd_drain(args: argparse.Namespace) -> int:
    status = 0
    clients = _each_coordinator(args)
    try:
        for address, client in clients:
            if len(clients) > 1:
                print(f"coordinator {address}:", flush=True)
            status = max(status, _drain_at(client, args))
    finally:
        for _, client in clients:
            client.close()
    return status


def _drain_at(client: CoordinatorClient, args: argparse.Namespace) -> int:
    response = client.drain(args.node)
    node = node_dict(response.node)
    print(f"{_describe(node)}, {node['in_flight']} in flight", flush=True)
    if response.drained:
        print(f"{args.node}: drained, no requests in flight")
        return 0
    if not args.wait:
        return 0
    return _wait_drained(client, args.node, args.timeout)


def cmd_undrain(args: argparse.Namespace) -> int:
    clients = _each_coordinator(args)
    try:
        for address, client in clients:
            node = node_dict(client.drain(args.node, undrain=True).node)
            prefix = f"coordinator {address}: " if len(clients) > 1 else ""
            print(prefix + _describe(node))
    finally:
        for _, client in clients:
            client.close()
    return 0


# -- omni generate -------------------------------------------------------------------------


async def stream_generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return await stream_request(args, build_request(args.prompt, None, _sampling(args)), out, err)


def chat_turns(args: argparse.Namespace) -> list[dict[str, str]]:
    """`omni chat`'s turns in order: --system, each --message, then MESSAGE (the user)."""
    turns = [{"role": "system", "content": args.system}] if args.system is not None else []
    turns += [{"role": role, "content": text} for role, text in args.messages]
    if args.message is not None:
        turns.append({"role": "user", "content": args.message})
    return turns


async def stream_chat(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    turns = chat_turns(args)
    if not turns:
        print("omni: nothing to send: give MESSAGE or --message ROLE:TEXT", file=err)
        return 2
    try:
        request = build_chat_request(turns, None, _sampling(args))
    except (TypeError, ValueError) as exc:
        print(f"omni: {exc}", file=err)
        return 2
    return await stream_request(args, request, out, err)


async def stream_request(
    args: argparse.Namespace, request: generate_pb2.GenerateRequest, out: TextIO, err: TextIO
) -> int:
    """Send ``request`` and write its text to ``out`` as it streams (`omni generate` and
    `omni chat`); with ``-v``, node, attempt and usage on ``err`` at the end."""
    target, options = targets.client_channel_target(args.coordinator)
    async with client_security(args).aio_channel(target, options) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        wrote = False
        last = None
        try:
            async for response in stub.Generate(request, timeout=args.timeout):
                if response.text:
                    out.write(response.text)
                    out.flush()
                    wrote = True
                last = response
        except grpc.aio.AioRpcError as exc:
            if wrote:
                out.write("\n")
                out.flush()
            # UNAVAILABLE is also the coordinator's own "no healthy nodes" answer; only a
            # channel that never connected means the coordinator itself is unreachable.
            connected = channel.get_state() == grpc.ChannelConnectivity.READY
            if exc.code() == grpc.StatusCode.UNAVAILABLE and not connected:
                raise CoordinatorUnreachable(args.coordinator, exc.details() or "") from None
            print(f"error: {exc.code().name}: {exc.details()}", file=err)
            return 1
    out.write("\n")
    out.flush()
    if args.verbose and last is not None:
        print(
            f"[{last.node_id}, attempt {last.attempt}, finish {last.finish_reason}, "
            f"{last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} completion "
            f"tokens]",
            file=err,
        )
    return 0


# The servers own their options: `omni config show` asks them (omni_rpc imports neither).
COMPONENT_MODULES = {"coordinator": "coordinator", "agent": "node_agent"}


def cmd_config_show(args: argparse.Namespace) -> int:
    module = COMPONENT_MODULES[args.component]
    done = subprocess.run([sys.executable, "-m", module, *args.options, "--print-config"])
    return done.returncode


def cmd_model_prepare(args: argparse.Namespace) -> int:
    try:
        path = models.prepare(args.name)
    except models.ModelError as exc:
        print(f"omni: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    for name in sorted(models.KNOWN):
        folder = models.cache_dir() / name
        where = str(folder) if (folder / "config.json").exists() else "(not prepared)"
        print(f"{name}  {where}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(stream_generate(args, sys.stdout, sys.stderr))


def cmd_chat(args: argparse.Namespace) -> int:
    return asyncio.run(stream_chat(args, sys.stdout, sys.stderr))


# -- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CoordinatorUnreachable as exc:
        print(f"omni: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        # The coordinator's answer, e.g. NOT_FOUND "no node 'node-9' (known: node-0, node-1)".
        code, details = exc.code(), exc.details()
        print(f"omni: {code.name}: {details}" if details else f"omni: {code.name}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `omni generate ... | head`: the reader left; say nothing more.
        sys.stderr.close()
        return 1


if __name__ == "__main__":
    sys.exit(main())
