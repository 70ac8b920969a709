"""Place agents on a Ray cluster: one actor per node, one GPU each, all-or-nothing.

Ray only places and restarts the agents; the data path is unchanged. Each actor runs an agent
server in its own process (on a thread with its own event loop), and that agent joins the
coordinator over gRPC like any other. A killed actor takes its server with it, so the
coordinator sees the node go and fails its calls over; Ray restarts the actor
(``max_restarts``) in the same placement-group bundle, and the new agent re-joins under the
same node id.

Placement goes through a placement group so a cluster too small for ``num_nodes`` is refused
up front instead of leaving some agents pending forever.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omni_rpc import config
from omni_rpc.launchers.gpus import PlacementError
from omni_rpc.launchers.local import LocalCluster
from omni_rpc.targets import join_host_port

# Per agent, unless the caller says otherwise: a GPU and a CPU core to drive it.
DEFAULT_RESOURCES: Mapping[str, float] = {"GPU": 1.0, "CPU": 1.0}
DEFAULT_MAX_RESTARTS = config.RAY_MAX_RESTARTS
PLACEMENT_TIMEOUT_S = 30.0
RAY_NAMESPACE = "omni-rpc"
# The coordinator of a Ray-placed cluster listens on every interface (agents on other machines).
COORDINATOR_LISTEN = "0.0.0.0:0"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PlacementError(
            "Ray is not installed: pip install 'omni-rpc[ray]' to place agents with Ray"
        ) from None
    return ray


class AgentActor:
    """A Ray actor hosting one node agent (``node_agent.main.serve``) on a thread."""

    def __init__(self, argv: Sequence[str], labels: Mapping[str, str]) -> None:
        # Imported here: these run in the actor's worker process, not the driver.
        from node_agent.main import build_parser
        from omni_rpc import settings
        from omni_rpc.logging import configure_logging

        ray = import_ray()
        args, _ = settings.parse(build_parser(), "agent", list(argv))
        # Bind the IP Ray knows this machine by: that is what the coordinator can dial.
        args.listen = f"{ray.util.get_node_ip_address()}:0"
        configure_logging(args.log_format, args.log_level, node_id=args.node_id)
        context = ray.get_runtime_context()
        self._labels = {
            **labels,
            "ray_node_id": context.get_node_id(),
            "ray_actor_id": context.get_actor_id() or "",
            "pid": str(os.getpid()),
        }
        self._ready = threading.Event()
        self._address = ""
        self._error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        # Not started from __init__'s caller: Ray re-runs __init__ after a restart, and the
        # agent must come back on its own then.
        self._thread = threading.Thread(
            target=self._run, args=(args,), name="omni-agent", daemon=True
        )
        self._thread.start()

    def _run(self, args: Any) -> None:
        from node_agent.main import serve

        async def main() -> int:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            return await serve(args, self._stop, self._labels, on_serving=self._serving)

        try:
            code = asyncio.run(main())
            if not self._address:
                self._error = f"agent exited with code {code} before serving"
        except BaseException as exc:
            self._error = f"agent failed: {type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def _serving(self, address: str) -> None:
        self._address = address
        self._ready.set()

    def address(self, timeout_s: float) -> str:
        """The agent's advertised address, once it serves; raises if it failed to start."""
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"agent not serving after {timeout_s:.0f}s")
        if self._error:
            raise RuntimeError(self._error)
        return self._address

    def stop(self, timeout_s: float = 30.0) -> None:
        """Drain and leave the coordinator, as SIGTERM would for a process agent."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)


@dataclass
class RayAgents:
    """``num_nodes`` agent actors on the Ray cluster at ``address`` (None: a local instance)."""

    num_nodes: int
    # The coordinators the agents join (their --coordinator): HOST:PORT, comma-joined.
    coordinator_address: str
    engine: str = "sim"
    model: str = "sim"
    agent_args: Sequence[str] = ()
    address: str | None = None
    resources: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    max_restarts: int = DEFAULT_MAX_RESTARTS
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S
    log_format: str = "json"
    # The node token the agents present (None: the cluster runs with --auth off). Passed in
    # the actors' environment, not their arguments.
    node_token: str | None = None
    actors: list[Any] = field(default_factory=list)
    placement_group: Any = None
    started_ray: bool = False

    def node_id(self, index: int) -> str:
        return f"ray-node-{index}"

    def connect(self) -> None:
        """Join the Ray cluster (or start a local one); checks its size before placing."""
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.address,
                    namespace=RAY_NAMESPACE,
                    log_to_driver=False,
                    include_dashboard=False,
                    configure_logging=False,
                )
            except ConnectionError as exc:
                raise PlacementError(
                    f"cannot connect to the Ray cluster at {self.address}: {exc}"
                ) from None
            self.started_ray = True
        try:
            self._check_capacity(ray.cluster_resources())
        except BaseException:
            self.close()
            raise

    def _check_capacity(self, total: Mapping[str, float]) -> None:
        short = {
            name: (total.get(name, 0.0), amount * self.num_nodes)
            for name, amount in self.resources.items()
            if total.get(name, 0.0) < amount * self.num_nodes
        }
        if short:
            have = ", ".join(f"{h:g} {name}" for name, (h, _) in short.items())
            need = ", ".join(f"{n:g} {name}" for name, (_, n) in short.items())
            raise PlacementError(
                f"the Ray cluster ({self.address or 'local'}) has {have} in total, and "
                f"{self.num_nodes} nodes need {need} ({dict(self.resources)} each): add nodes "
                f"to the Ray cluster or ask for fewer nodes"
            )

    def place(self, startup_timeout_s: float) -> list[str]:
        """Reserve every bundle, start every actor, and return the agents' addresses."""
        ray = import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        # SPREAD: agents on as many machines as possible, so one machine lost takes few nodes.
        bundles = [dict(self.resources) for _ in range(self.num_nodes)]
        self.placement_group = placement_group(bundles, strategy="SPREAD", name="omni-agents")
        try:
            ray.get(self.placement_group.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement_group)
            self.placement_group = None
            self.close()
            raise PlacementError(
                f"Ray could not reserve {self.num_nodes} x {dict(self.resources)} within "
                f"{self.placement_timeout_s:.0f}s (resources in use by other jobs, or no single "
                "machine fits one bundle): nothing was started"
            ) from None
        remote_actor = ray.remote(AgentActor)
        extra = {k: v for k, v in self.resources.items() if k not in ("GPU", "CPU")}
        for index in range(self.num_nodes):
            actor = remote_actor.options(
                num_gpus=self.resources.get("GPU", 0.0),
                num_cpus=self.resources.get("CPU", 0.0),
                resources=extra or None,
                max_restarts=self.max_restarts,
                runtime_env=(
                    {"env_vars": {"OMNI_NODE_TOKEN": self.node_token}} if self.node_token else None
                ),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group,
                    placement_group_bundle_index=index,
                ),
            ).remote(self._argv(index), {"ray_bundle": str(index)})
            self.actors.append(actor)
        deadline = time.monotonic() + startup_timeout_s
        try:
            return [
                ray.get(
                    actor.address.remote(max(1.0, deadline - time.monotonic())),
                    timeout=max(1.0, deadline - time.monotonic()) + 10.0,
                )
                for actor in self.actors
            ]
        except BaseException:
            self.close()
            raise

    def _argv(self, index: int) -> list[str]:
        return [
            "--coordinator",
            self.coordinator_address,
            "--node-id",
            self.node_id(index),
            "--engine",
            self.engine,
            "--model",
            self.model,
            "--launcher",
            "ray",
            "--log-format",
            self.log_format,
            *([] if self.node_token else ["--auth", "off"]),
            *self.agent_args,
        ]

    def close(self) -> None:
        """Stop every actor (draining first), remove the placement group, leave Ray."""
        try:
            ray = import_ray()
        except PlacementError:
            return
        if not ray.is_initialized():
            return
        stops = []
        for actor in self.actors:
            try:
                stops.append(actor.stop.remote(config.SHUTDOWN_GRACE_S))
            except Exception:  # an actor already gone has nothing to stop
                pass
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=config.SHUTDOWN_GRACE_S + 5)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def start(
    cluster: LocalCluster,
    agents: RayAgents,
    startup_timeout_s: float,
    on_coordinator: Callable[[LocalCluster], None] | None = None,
) -> str:
    """Check Ray's capacity, start the coordinators, place the agents.

    ``cluster`` runs only the coordinators (no local agents), listening on every interface so
    actors on other machines can join; agents dial each at the IP Ray knows this machine by
    (``agents.coordinator_address``: every coordinator, comma-joined).
    Listening beyond loopback, the cluster should have ``auth=True``: the agents get the node
    token from it.
    Returns the addresses local clients use, comma-joined (the HTTP front door, if
    ``cluster.http_listen`` asks for one, is ``cluster.http_url``). ``on_coordinator`` is
    called once the coordinators listen, before the agents are placed. On failure nothing is
    left running.
    """
    agents.connect()  # refuses a cluster too small before anything starts
    try:
        cluster.start(startup_timeout_s, on_coordinator)
        ports = [int(address.rsplit(":", 1)[1]) for address in cluster.coordinator_addresses]
        agents.node_token = cluster.tokens.get("node")
        node_ip = import_ray().util.get_node_ip_address()
        agents.coordinator_address = ",".join(join_host_port(node_ip, port) for port in ports)
        agents.place(startup_timeout_s)
    except BaseException:
        agents.close()
        cluster.stop()
        raise
    return ",".join(f"127.0.0.1:{port}" for port in ports)
