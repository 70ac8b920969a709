"""The SDK's ``LoadBalancer`` and ``HealthMonitor``: views of the coordinator's state."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.strategies import Candidate, make_strategy
from omni_rpc import config
from omni_rpc.sdk.client import CoordinatorClient, node_dict
from omni_rpc.sdk.results import GenerationError, Prompt
from omni_rpc.security import ChannelSecurity
from omni_rpc.v1 import coordinator_pb2

# The coordinator of the orchestrator started last in this process, as its agents reach it:
# what HealthMonitor.remote() connects to when given no address.
_current_coordinator = ""
_current_token: str | None = None


def remember_coordinator(address: str, token: str | None) -> None:
    global _current_coordinator, _current_token
    _current_coordinator, _current_token = address, token


@dataclass
class _Planned:
    """A node as a strategy sees it while planning a distribution."""

    node_id: str
    in_flight: int
    capacity: int
    kv_cache_usage: float = 0.0
    # A plan counts only the requests it places, and knows no prompts (no prefix cache).
    others_in_flight: int = 0
    cache_block_tokens: int = 0
    cache_capacity_tokens: int = 0


class LoadBalancer:
    """Plans and load figures: the coordinator's strategies over its live node state."""

    def __init__(
        self,
        strategy: str = config.DEFAULT_STRATEGY,
        *,
        coordinator: str | None = None,
        client: CoordinatorClient | None = None,
    ) -> None:
        self.strategy_name = strategy
        self.strategy = make_strategy(strategy)
        if client is None:
            if coordinator is None:
                raise ValueError("LoadBalancer needs coordinator='host:port' or a client")
            client = CoordinatorClient(coordinator)
        self._client = client

    def distribute_requests(
        self, prompts: Sequence[Prompt], healthy_nodes: Sequence[str] | None = None
    ) -> dict[str, list[Prompt]]:
        """Plan which node each prompt would go to, as the coordinator's strategy would.

        ``healthy_nodes`` restricts the plan to those node ids (default: the healthy ones).
        """
        nodes = {n.node_id: n for n in self._client.nodes()}
        ids = (
            sorted(healthy_nodes)  # strategies take their candidates in node id order
            if healthy_nodes is not None
            else [i for i, n in nodes.items() if n.state == coordinator_pb2.NODE_STATE_HEALTHY]
        )
        if not ids:
            raise GenerationError(grpc.StatusCode.UNAVAILABLE, "no healthy nodes available")
        planned = [
            _Planned(i, nodes[i].in_flight, nodes[i].capacity, nodes[i].load.kv_cache_usage)
            if i in nodes
            else _Planned(i, 0, 0)
            for i in ids
        ]
        plan: dict[str, list[Prompt]] = {i: [] for i in ids}
        candidates: list[Candidate] = sorted(planned, key=lambda c: c.node_id)
        for prompt in prompts:
            chosen = self.strategy.pick(candidates, prompt if isinstance(prompt, str) else "")
            assert isinstance(chosen, _Planned)
            chosen.in_flight += 1
            plan[chosen.node_id].append(prompt)
        return plan

    def get_load_stats(self) -> dict[str, dict[str, Any]]:
        """Per node: the coordinator's counts and the engine's reported load."""
        return {
            n.node_id: {
                "state": node_dict(n)["state"],
                "in_flight": n.in_flight,
                "dispatched": n.dispatched,
                "served": n.served,
                "capacity": n.capacity,
                **{
                    k: v
                    for k, v in node_dict(n)["load"].items()
                    if k in ("running", "waiting", "kv_cache_usage")
                },
            }
            for n in self._client.nodes()
        }


class HealthMonitor:
    """Healthy nodes and per-node health figures, read from the coordinator."""

    def __init__(
        self,
        *,
        coordinator: str | None = None,
        client: CoordinatorClient | None = None,
        token: str | None = None,
    ) -> None:
        if client is None:
            if coordinator is None:
                raise ValueError("HealthMonitor needs coordinator='host:port' or a client")
            security = ChannelSecurity(token=token or os.environ.get("OMNI_TOKEN") or None)
            client = CoordinatorClient(coordinator, security=security)
        self._client = client

    def get_healthy_nodes(self) -> list[str]:
        return list(self._client.stats().healthy_nodes)

    def get_health_stats(self) -> dict[str, dict[str, Any]]:
        return {n.node_id: node_dict(n) for n in self._client.nodes()}

    @classmethod
    def remote(cls, *, coordinator: str | None = None, **actor_options: Any) -> Any:
        """A HealthMonitor as a Ray actor: ``HealthMonitor.remote()``.

        Reads the coordinator at ``coordinator``, else ``OMNI_COORDINATOR``, else the one the
        last DistributedOrchestrator of this process started. Its methods return ObjectRefs:
        ``await monitor.get_health_stats.remote()``.
        """
        address = coordinator or os.environ.get("OMNI_COORDINATOR") or _current_coordinator
        if not address:
            raise ValueError(
                "HealthMonitor.remote() has no coordinator: start a DistributedOrchestrator "
                "first, pass coordinator='host:port', or set OMNI_COORDINATOR"
            )
        from omni_rpc.launchers.ray_actors import import_ray

        ray = import_ray()
        actor = ray.remote(_HealthMonitorActor)
        options: dict[str, Any] = {"num_cpus": 0, **actor_options}
        token = os.environ.get("OMNI_TOKEN") or (None if coordinator else _current_token)
        if token:  # in the actor's environment, not its arguments
            options.setdefault("runtime_env", {}).setdefault("env_vars", {})["OMNI_TOKEN"] = token
        return actor.options(**options).remote(address)


class _HealthMonitorActor:
    """The body of ``HealthMonitor.remote()`` (Ray wraps this class, not HealthMonitor, whose
    own ``remote`` classmethod would shadow Ray's)."""

    def __init__(self, coordinator: str) -> None:
        self._monitor = HealthMonitor(coordinator=coordinator)

    def get_healthy_nodes(self) -> list[str]:
        return self._monitor.get_healthy_nodes()

    def get_health_stats(self) -> dict[str, dict[str, Any]]:
        return self._monitor.get_health_stats()
