"""The Python SDK: the seed document's ``DistributedOrchestrator``, ``LoadBalancer`` and
``HealthMonitor``, over the coordinator's gRPC services.

Without ``coordinator=`` the orchestrator starts a cluster and stops it in ``close()``: a
coordinator as a child process, and ``num_nodes`` agents either as child processes (one per
GPU) or, with ``ray_address`` or ``launcher="ray"``, as actors on a Ray cluster.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import grpc

from omni_rpc import config, ray_launcher
from omni_rpc import gpus as gpu_placement
from omni_rpc.backoff import Backoff
from omni_rpc.client import CoordinatorClient, node_dict, stats_dict
from omni_rpc.launcher import LocalCluster
from omni_rpc.security import ChannelSecurity, TlsFiles
from omni_rpc.strategies import STRATEGIES, Candidate, make_strategy
from omni_rpc.v1 import coordinator_pb2, coordinator_pb2_grpc, generate_pb2

Prompt = str | Sequence[int]

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
ENGINES = ("sim", "vllm")
LAUNCHERS = ("local", "ray")
# The coordinator of the orchestrator started last in this process, as its agents reach it:
# what HealthMonitor.remote() connects to when given no address (as in the seed).
_current_coordinator = ""
_current_token: str | None = None


class GenerationError(RuntimeError):
    """A request that could not be served; ``code`` is the gRPC status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, request_id: str = "", index: int | None = None
    ) -> None:
        where = f"prompt #{index}: " if index is not None else ""
        super().__init__(f"{where}{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.index = index


@dataclass
class GenerationDelta:
    """One streamed message: new text and token ids since the previous delta."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    node_id: str
    attempt: int
    request_id: str
    # Set on the last delta: token counts of the whole generation.
    usage: dict[str, int] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    node_id: str
    # Nodes that worked on the request, in order (more than one after a failover).
    attempts: int
    usage: dict[str, int]
    request_id: str = ""
    nodes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def build_request(
    prompt: Prompt, max_retries: int | None, sampling: dict[str, Any]
) -> generate_pb2.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(
            f"unknown sampling argument(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(SAMPLING_KEYS)}"
        )
    request = generate_pb2.GenerateRequest()
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(int(t) for t in prompt)
    if max_retries is not None:
        request.max_retries = max_retries
    params = request.sampling
    for key, value in sampling.items():
        if value is None:
            continue
        if key == "stop":
            params.stop.extend([value] if isinstance(value, str) else list(value))
        else:
            setattr(params, key, value)
    return request


def _usage(response: generate_pb2.GenerateResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.usage.prompt_tokens,
        "completion_tokens": response.usage.completion_tokens,
    }


def _engine_flags(engine: str, memory_buffer_gb: float | None) -> list[str]:
    if engine == "vllm" and memory_buffer_gb is not None:
        return ["--memory-buffer-gb", str(memory_buffer_gb)]
    return []


def _coordinator_unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the transport, not a verdict of the coordinator (which marks its
    own errors with trailing metadata)."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    trailing = exc.trailing_metadata() or ()
    return config.FINAL_ERROR_METADATA not in {str(item[0]) for item in trailing}  # type: ignore[index]


class _Omitted:
    """The default of ``ray_address``: distinguishes "not passed" from an explicit None."""

    def __repr__(self) -> str:
        return "<omitted>"


OMITTED = _Omitted()


class DistributedOrchestrator:
    """Generate across a cluster of vLLM nodes with load balancing and failover."""

    def __init__(
        self,
        model: str | None = None,
        num_nodes: int = config.DEFAULT_NUM_NODES,
        load_balancing_strategy: str = config.DEFAULT_STRATEGY,
        health_check_interval: float = config.DEFAULT_HEALTH_CHECK_INTERVAL_S,
        max_retries: int = config.DEFAULT_MAX_RETRIES,
        ray_address: str | _Omitted | None = OMITTED,
        memory_buffer_gb: float | None = None,
        *,
        coordinator: str | None = None,
        engine: str = "sim",
        timeout: float = config.DEFAULT_REQUEST_TIMEOUT_S,
        startup_timeout: float | None = None,
        agent_args: Sequence[str] = (),
        coordinator_args: Sequence[str] = (),
        launcher: str | None = None,
        gpus: str | Sequence[int] = "auto",
        ray_resources: Mapping[str, float] | None = None,
        ray_max_restarts: int = ray_launcher.DEFAULT_MAX_RESTARTS,
        token: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """``launcher``: "local" (child processes) or "ray"; default "ray" when
        ``ray_address`` is passed, else "local". ``ray_address``: "auto",
        "ray://head:10001", "host:6379", or ``None`` for a local Ray instance started here, as
        in the seed (``ray_address=None  # Local Ray cluster``); not passing it at all runs
        the agents as child processes, without Ray.
        ``gpus``: for local agents, "auto" (vLLM: one agent per GPU), "all", "none" or a list
        of indices. ``ray_resources``: per Ray agent (default one GPU and one CPU).
        ``token`` (default ``OMNI_TOKEN``) and ``tls`` (CA, and a client certificate for
        mutual TLS) secure the calls to a coordinator given by ``coordinator=``."""
        global _current_coordinator, _current_token
        address = None if isinstance(ray_address, _Omitted) else ray_address
        launcher = launcher or ("local" if isinstance(ray_address, _Omitted) else "ray")
        if launcher not in LAUNCHERS:
            raise ValueError(f"unknown launcher {launcher!r} (known: {', '.join(LAUNCHERS)})")
        if load_balancing_strategy not in STRATEGIES:
            raise ValueError(
                f"unknown load_balancing_strategy {load_balancing_strategy!r} "
                f"(known: {', '.join(sorted(STRATEGIES))})"
            )
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        if not health_check_interval > 0:
            raise ValueError(f"health_check_interval must be > 0, got {health_check_interval!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if memory_buffer_gb is not None and not memory_buffer_gb >= 0:
            raise ValueError(f"memory_buffer_gb must be >= 0, got {memory_buffer_gb!r}")
        if coordinator is None and engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r} (available: {', '.join(ENGINES)})")
        self.model = model
        self.num_nodes = num_nodes
        self.load_balancing_strategy = load_balancing_strategy
        self.health_check_interval = health_check_interval
        self.max_retries = max_retries
        self.memory_buffer_gb = memory_buffer_gb
        self.timeout = timeout
        self.startup_timeout = startup_timeout or config.STARTUP_TIMEOUT_S.get(engine, 60.0)
        self.security = ChannelSecurity(
            token=token or os.environ.get("OMNI_TOKEN") or None, tls=tls or TlsFiles()
        )
        self.cluster: LocalCluster | None = None
        self.ray_agents: ray_launcher.RayAgents | None = None
        self._ready = coordinator is not None
        reachable_at = coordinator or ""
        if coordinator is None:
            model = model or config.DEFAULT_MODELS[engine]
            every_agent = [*agent_args, *_engine_flags(engine, memory_buffer_gb)]
            on_ray = launcher == "ray"
            self.cluster = LocalCluster(
                num_nodes=0 if on_ray else num_nodes,
                strategy=load_balancing_strategy,
                health_check_interval=health_check_interval,
                max_retries=max_retries,
                engine=engine,
                model=model,
                coordinator_listen=ray_launcher.COORDINATOR_LISTEN if on_ray else "127.0.0.1:0",
                agent_args=every_agent,
                coordinator_args=coordinator_args,
                gpus=None if on_ray else gpu_placement.assign(num_nodes, engine, gpus),
                # Ray's coordinator listens beyond loopback: tokens for every role then.
                auth=on_ray,
            )
            if on_ray:
                self.security = ChannelSecurity(token=self.cluster.tokens.get("admin"))
                self.ray_agents = ray_launcher.RayAgents(
                    num_nodes=num_nodes,
                    coordinator_address="",
                    engine=engine,
                    model=model,
                    agent_args=every_agent,
                    address=address,
                    resources=dict(ray_resources or ray_launcher.DEFAULT_RESOURCES),
                    max_restarts=ray_max_restarts,
                )
                coordinator = ray_launcher.start(
                    self.cluster, self.ray_agents, self.startup_timeout
                )
                reachable_at = self.ray_agents.coordinator_address
            else:
                try:
                    coordinator = reachable_at = self.cluster.start(self.startup_timeout)
                except BaseException:
                    self.cluster.stop()  # leave no half-started cluster behind
                    raise
        _current_coordinator = reachable_at
        _current_token = self.security.token
        self.coordinator = coordinator
        self._client = CoordinatorClient(coordinator, security=self.security)
        self._aio: (
            tuple[
                asyncio.AbstractEventLoop,
                grpc.aio.Channel,
                coordinator_pb2_grpc.CoordinatorAsyncStub,
            ]
            | None
        ) = None
        self.load_balancer = LoadBalancer(load_balancing_strategy, client=self._client)
        self.health_monitor = HealthMonitor(client=self._client)

    # -- readiness -------------------------------------------------------------------------

    def _healthy_count(self) -> int:
        return len(self._client.stats().healthy_nodes)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the local cluster's nodes are all healthy."""
        if self._ready:
            return
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            assert self.cluster is not None
            self.cluster.check_alive()
            if self._healthy_count() >= self.num_nodes:
                self._ready = True
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"local cluster not ready: {self._healthy_count()}/{self.num_nodes} nodes "
                    f"healthy after {timeout or self.startup_timeout:.0f}s (logs in "
                    f"{self.cluster.log_dir})"
                )
            time.sleep(0.05)

    async def _ensure_ready(self) -> None:
        if not self._ready:
            await asyncio.to_thread(self.wait_ready)

    def _stub(self) -> coordinator_pb2_grpc.CoordinatorAsyncStub:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            channel = self.security.aio_channel(self.coordinator)
            self._aio = (loop, channel, coordinator_pb2_grpc.CoordinatorStub(channel))
        return self._aio[2]

    # -- generation ------------------------------------------------------------------------

    async def stream(
        self,
        prompt: Prompt,
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream one generation as deltas.

        While the coordinator is unreachable (restarting, say), a call that has received
        nothing yet waits and is retried with backoff until its deadline; failover between
        nodes is the coordinator's job.
        """
        request = build_request(prompt, max_retries, sampling)
        await self._ensure_ready()
        deadline = time.monotonic() + (timeout or self.timeout)
        backoff = Backoff(config.RETRY_BACKOFF_BASE_S, config.RETRY_BACKOFF_CAP_S)
        while True:
            received = False
            call = self._stub().Generate(
                request, timeout=max(0.0, deadline - time.monotonic()), wait_for_ready=True
            )
            try:
                async for response in call:
                    received = True
                    yield GenerationDelta(
                        text=response.text,
                        token_ids=list(response.token_ids),
                        finish_reason=response.finish_reason or None,
                        node_id=response.node_id,
                        attempt=response.attempt,
                        request_id=response.request_id,
                        usage=_usage(response) if response.finish_reason else None,
                    )
                return
            except grpc.aio.AioRpcError as exc:
                retry = not received and _coordinator_unreachable(exc)
                if not retry or time.monotonic() >= deadline:
                    raise GenerationError(
                        exc.code(), exc.details() or "", request.request_id
                    ) from None
            finally:
                call.cancel()
            await backoff.sleep(deadline - time.monotonic())

    async def generate_one(
        self,
        prompt: Prompt,
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Generate for one prompt and return the whole result."""
        texts: list[str] = []
        token_ids: list[int] = []
        nodes: list[str] = []
        last: GenerationDelta | None = None
        async for delta in self.stream(prompt, max_retries, timeout=timeout, **sampling):
            texts.append(delta.text)
            token_ids.extend(delta.token_ids)
            if not nodes or nodes[-1] != delta.node_id:
                nodes.append(delta.node_id)
            last = delta
        assert last is not None and last.usage is not None  # streams end with a final delta
        return GenerationResult(
            text="".join(texts),
            token_ids=token_ids,
            finish_reason=last.finish_reason or "",
            node_id=last.node_id,
            attempts=last.attempt,
            usage=last.usage,
            request_id=last.request_id,
            nodes=nodes,
        )

    async def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        return_exceptions: bool = False,
        **sampling: Any,
    ) -> list[Any]:
        """Generate for every prompt concurrently; results in input order.

        A prompt that cannot be served raises ``GenerationError`` (after the others finish),
        or, with ``return_exceptions=True``, takes its place in the list.
        """
        batch: list[Prompt] = (
            [prompts] if isinstance(prompts, str) else list(cast(Sequence[Prompt], prompts))
        )
        for prompt in batch:
            build_request(prompt, max_retries, sampling)  # argument errors before any traffic
        outcomes = await asyncio.gather(
            *(self.generate_one(p, max_retries, timeout=timeout, **sampling) for p in batch),
            return_exceptions=True,
        )
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, GenerationError):
                outcome.index = index
                outcome.args = (f"prompt #{index}: {outcome.args[0]}",)
            if isinstance(outcome, BaseException) and not return_exceptions:
                failed = sum(isinstance(o, BaseException) for o in outcomes)
                if failed > 1 and isinstance(outcome, GenerationError):
                    outcome.args = (f"{outcome.args[0]} ({failed} of {len(batch)} failed)",)
                raise outcome
        return list(outcomes)

    # -- monitoring ------------------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        """Cluster statistics with the seed's keys (a plain dict)."""
        return stats_dict(self._client.stats())

    def drain(self, node_id: str) -> dict[str, Any]:
        return node_dict(self._client.drain(node_id).node)

    def undrain(self, node_id: str) -> dict[str, Any]:
        return node_dict(self._client.drain(node_id, undrain=True).node)

    # -- life cycle ------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio[1].close(None)
            self._aio = None
        self.close()

    def close(self) -> None:
        """Close channels and stop the local cluster, if this orchestrator started one."""
        if self._aio is not None:
            loop, channel, _ = self._aio
            self._aio = None
            if not loop.is_closed() and loop.is_running():
                loop.create_task(channel.close(None))
        self._client.close()
        if self.ray_agents is not None:
            self.ray_agents.close()
            self.ray_agents = None
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    async def __aenter__(self) -> DistributedOrchestrator:
        await self._ensure_ready()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> DistributedOrchestrator:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Planned:
    """A node as a strategy sees it while planning a distribution."""

    node_id: str
    in_flight: int
    capacity: int
    kv_cache_usage: float = 0.0


class LoadBalancer:
    """The seed's LoadBalancer: the coordinator's strategies over its live node state."""

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
            list(healthy_nodes)
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
        candidates: list[Candidate] = list(planned)
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
    """The seed's HealthMonitor, reading the coordinator's health state."""

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
        """A HealthMonitor as a Ray actor, as in the seed: ``HealthMonitor.remote()``.

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
        ray = ray_launcher.import_ray()
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
