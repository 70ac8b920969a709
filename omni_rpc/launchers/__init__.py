"""Launchers: start a coordinator and its agents as local processes or as Ray actors.

Above the servers in the layering: a launcher starts ``coordinator`` and ``node_agent`` as
processes (or embeds the agent in a Ray actor), and the SDK and the CLI use it to bring up a
cluster. Nothing below it (the runtime, the servers, the SDK's client side) imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from omni_rpc import config
from omni_rpc.launchers import gpus as gpu_placement
from omni_rpc.launchers import ray_actors
from omni_rpc.launchers.gpus import PlacementError
from omni_rpc.launchers.local import LaunchError, LocalCluster

LAUNCHERS = config.LAUNCHERS


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
    # Ray: the cluster's address (None: a local Ray instance started here), per-agent
    # resources and restarts.
    ray_address: str | None = None
    ray_resources: Mapping[str, float] = field(
        default_factory=lambda: dict(ray_actors.DEFAULT_RESOURCES)
    )
    ray_max_restarts: int = config.RAY_MAX_RESTARTS


@dataclass
class StartedCluster:
    processes: LocalCluster
    # Where this process reaches the coordinator, and where its agents do.
    coordinator: str
    reachable_at: str
    ray_agents: ray_actors.RayAgents | None = None

    def stop(self) -> None:
        if self.ray_agents is not None:
            self.ray_agents.close()
            self.ray_agents = None
        self.processes.stop()


def start_cluster(plan: ClusterPlan, startup_timeout_s: float) -> StartedCluster:
    """Start the cluster ``plan`` describes; on failure nothing is left running."""
    if plan.launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {plan.launcher!r} (known: {', '.join(LAUNCHERS)})")
    on_ray = plan.launcher == "ray"
    processes = LocalCluster(
        num_nodes=0 if on_ray else plan.num_nodes,
        strategy=plan.strategy,
        health_check_interval=plan.health_check_interval,
        max_retries=plan.max_retries,
        engine=plan.engine,
        model=plan.model,
        coordinator_listen=ray_actors.COORDINATOR_LISTEN if on_ray else "127.0.0.1:0",
        agent_args=plan.agent_args,
        coordinator_args=plan.coordinator_args,
        gpus=None if on_ray else gpu_placement.assign(plan.num_nodes, plan.engine, plan.gpus),
        # Ray's coordinator listens beyond loopback: tokens for every role then.
        auth=on_ray,
    )
    if not on_ray:
        try:
            address = processes.start(startup_timeout_s)
        except BaseException:
            processes.stop()  # leave no half-started cluster behind
            raise
        return StartedCluster(processes, address, address)
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
    address = ray_actors.start(processes, agents, startup_timeout_s)
    return StartedCluster(processes, address, agents.coordinator_address, agents)


__all__ = [
    "LAUNCHERS",
    "ClusterPlan",
    "LaunchError",
    "LocalCluster",
    "PlacementError",
    "StartedCluster",
    "start_cluster",
]
