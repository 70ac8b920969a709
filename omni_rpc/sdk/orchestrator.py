"""``DistributedOrchestrator``: generate across the cluster through the coordinator.

Without ``coordinator=`` the orchestrator starts a cluster and stops it in ``close()``: a
coordinator as a child process, and ``num_nodes`` agents either as child processes (one per
GPU) or, with ``ray_address`` or ``launcher="ray"``, as actors on a Ray cluster. Starting one
goes through ``omni_rpc.launchers``, imported only then: a client of a running coordinator
never loads the launchers or Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc

from coordinator.strategies import STRATEGIES
from omni_rpc import config, targets
from omni_rpc.backoff import Backoff
from omni_rpc.sdk.chat import ChatMessages, chat_messages, media_inputs
from omni_rpc.sdk.client import CoordinatorClient, node_dict, stats_dict
from omni_rpc.sdk.monitor import HealthMonitor, LoadBalancer, remember_coordinator
from omni_rpc.sdk.results import (
    CoordinatorUnreachableError,
    GenerationDelta,
    GenerationError,
    GenerationResult,
    MediaOutput,
    Prompt,
)
from omni_rpc.security import ChannelSecurity, TlsFiles
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2

if TYPE_CHECKING:
    from omni_rpc.launchers import Cluster
    from omni_rpc.launchers.local import LocalCluster
    from omni_rpc.launchers.ray_actors import RayAgents

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")


def _new_request(max_retries: int | None, sampling: dict[str, Any]) -> generate_pb2.GenerateRequest:
    """A request with its model, retries and sampling set, and no input yet."""
    sampling = dict(sampling)
    # Not a sampling parameter: the model to route to (GenerateRequest.model).
    model = sampling.pop("model", None)
    # Nor this: the output modalities, e.g. ["text", "audio"] (GenerateRequest.modalities).
    modalities = sampling.pop("modalities", None)
    # Nor this: media inputs, Media(mime_type, data) or (mime_type, data) tuples.
    inputs = sampling.pop("inputs", None)
    # Nor this: requests with one key prefer one node (GenerateRequest.affinity_key: a user or
    # chat session; the consistent_hash strategy routes by it, cache_aware takes it as a hint).
    affinity_key = sampling.pop("affinity_key", None)
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(
            f"unknown sampling argument(s) {', '.join(sorted(unknown))}; "
            f"known: model, {', '.join(SAMPLING_KEYS)}, modalities, inputs, affinity_key"
        )
    request = generate_pb2.GenerateRequest(model=model or "", affinity_key=affinity_key or "")
    if inputs is not None:
        request.inputs.extend(media_inputs(inputs))
    if modalities:
        request.modalities.extend([modalities] if isinstance(modalities, str) else modalities)
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


def build_request(
    prompt: Prompt, max_retries: int | None, sampling: dict[str, Any]
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest for a prompt (text or token ids); TypeError for an unknown
    sampling argument (``model`` routes the request: GenerateRequest.model)."""
    request = _new_request(max_retries, sampling)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(int(t) for t in prompt)
    return request


def build_chat_request(
    messages: ChatMessages, max_retries: int | None, sampling: dict[str, Any]
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest for a chat in OpenAI's shape (see ``omni_rpc.sdk.chat``)."""
    request = _new_request(max_retries, sampling)
    request.messages.extend(chat_messages(messages))
    return request


async def _collect(deltas: AsyncGenerator[GenerationDelta, None]) -> GenerationResult:
    """A whole result from a stream of deltas."""
    texts: list[str] = []
    token_ids: list[int] = []
    nodes: list[str] = []
    outputs: list[MediaOutput] = []
    last: GenerationDelta | None = None
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            texts.append(delta.text)
            token_ids.extend(delta.token_ids)
            outputs.extend(delta.outputs)
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
        outputs=sorted(outputs, key=lambda item: item.index),
    )


def _media_items(
    response: generate_pb2.GenerateResponse, partial: dict[int, list[bytes]]
) -> list[MediaOutput]:
    """The media items ``response`` completes, assembled from their pieces (``partial`` holds
    the pieces of those still in progress)."""
    items: list[MediaOutput] = []
    for piece in response.outputs:
        pieces = partial.setdefault(piece.index, [])
        pieces.append(piece.data)
        if piece.last_chunk:
            del partial[piece.index]
            items.append(MediaOutput(piece.index, piece.mime_type, b"".join(pieces)))
    return items


class Received:
    """What one call has received, across coordinators: the resume point of its next part."""

    def __init__(self, request: generate_pb2.GenerateRequest) -> None:
        self.request_id = request.request_id
        self.token_ids: list[int] = list(request.resume.token_ids)
        self.text: list[str] = [request.resume.text] if request.resume.text else []
        self.media_items = request.resume.media_items_delivered
        self.any = False
        # The message with the finish_reason arrived: the output is whole.
        self.finished = False

    def add(self, response: generate_pb2.GenerateResponse) -> None:
        self.any = True
        # The coordinator names the request when the caller did not: a continuation must carry
        # the same id.
        self.request_id = self.request_id or response.request_id
        self.token_ids.extend(response.token_ids)
        if response.text:
            self.text.append(response.text)
        self.media_items += sum(1 for piece in response.outputs if piece.last_chunk)
        self.finished = self.finished or bool(response.finish_reason)

    def resume(self, request: generate_pb2.GenerateRequest) -> None:
        """Make ``request`` continue after everything received."""
        request.request_id = self.request_id
        request.resume.token_ids[:] = self.token_ids
        request.resume.text = "".join(self.text)
        request.resume.media_items_delivered = self.media_items


def _usage(response: generate_pb2.GenerateResponse) -> dict[str, int]:
    return {
        "prompt_tokens": response.usage.prompt_tokens,
        "completion_tokens": response.usage.completion_tokens,
        # Of the prompt, the tokens the engine found in its prefix cache.
        "cached_prompt_tokens": response.usage.cached_prompt_tokens,
    }


def _engine_flags(engine: str, memory_buffer_gb: float | None) -> list[str]:
    """The agents' flags for ``memory_buffer_gb`` (vLLM only)."""
    if engine == "vllm" and memory_buffer_gb is not None:
        return ["--memory-buffer-gb", str(memory_buffer_gb)]
    return []


# How a call ends when its coordinator went away rather than answered: the transport broke
# (UNAVAILABLE), or the server shut down while the call was being accepted (CANCELLED: the
# caller's own cancellation is asyncio's CancelledError here, never a status).
_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _coordinator_unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """The coordinator went away, not a verdict of it (which marks its own errors with
    trailing metadata, omni-final)."""
    if exc.code() not in _GONE:
        return False
    trailing = exc.trailing_metadata() or ()
    return config.FINAL_ERROR_METADATA not in {str(item[0]) for item in trailing}  # type: ignore[index]


class _Omitted:
    """The default of ``ray_address``: distinguishes "not passed" from an explicit None."""

    def __repr__(self) -> str:
        return "<omitted>"


OMITTED = _Omitted()


class DistributedOrchestrator:
    """Generate across a cluster of vLLM nodes with load balancing and failover.

    Without ``coordinator=`` it starts a cluster whose engine follows ``model``: vLLM for a
    model (a folder, a hub id or a known name such as ``smollm2-135m-instruct``), simulated
    agents for ``model="sim"`` or no model. ``engine="sim"`` or ``engine="vllm"`` says so
    explicitly (a simulated engine then serves under any name you give it)."""

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
        coordinator: str | Sequence[str] | None = None,
        num_coordinators: int = 1,
        engine: str | None = None,
        timeout: float = config.DEFAULT_REQUEST_TIMEOUT_S,
        connect_timeout: float = config.DEFAULT_CONNECT_TIMEOUT_S,
        startup_timeout: float | None = None,
        agent_args: Sequence[str] = (),
        coordinator_args: Sequence[str] = (),
        launcher: str | None = None,
        gpus: str | Sequence[int] = "auto",
        ray_resources: Mapping[str, float] | None = None,
        ray_max_restarts: int = config.RAY_MAX_RESTARTS,
        token: str | None = None,
        tls: TlsFiles | None = None,
        http_url: str | None = None,
        cpu_cores: str = "auto",
        keepalive_time: float = config.CLIENT_KEEPALIVE_TIME_S,
        keepalive_timeout: float = config.CLIENT_KEEPALIVE_TIMEOUT_S,
    ) -> None:
        """``launcher``: "local" (child processes) or "ray"; default "ray" when
        ``ray_address`` is passed, else "local". ``ray_address``: "auto",
        "ray://head:10001", "host:6379", or ``None`` for a local Ray instance started here
        (``ray_address=None  # Local Ray cluster``); not passing it at all runs the agents as
        child processes, without Ray.
        ``gpus``: for local agents, "auto" (vLLM: one agent per GPU), "all", "none" or a list
        of indices. ``ray_resources``: per Ray agent (default one GPU and one CPU).
        ``engine``: None (the default) follows ``model``: "sim" or no model runs simulated
        agents (serving the model "sim"), any other model runs vLLM; "sim" or "vllm" chooses.
        ``cpu_cores``: local vLLM agents without GPUs, "auto" binds each to its own share of
        this process's cores, "none" leaves vLLM's own thread binding.
        ``timeout``: each request's deadline (default 600 s). ``connect_timeout``: how long a
        request waits for a coordinator this orchestrator has never reached before raising
        ``CoordinatorUnreachableError`` (a ``GenerationError`` and a ``ConnectionError``,
        naming the address); once reached, a coordinator that goes away (restarting) is
        waited for until the request's deadline.
        ``token`` (default ``OMNI_TOKEN``) and ``tls`` (CA, and a client certificate for
        mutual TLS) secure the calls to a coordinator given by ``coordinator=``;
        ``http_url`` is its HTTP front door, if you want ``orch.http_url`` to say it (a
        cluster started here serves one and sets it).
        ``coordinator`` may name several coordinators: a list, ``"a:1,b:2"``, or
        ``"dns:///NAME:PORT"`` (every address of the name). Calls are spread over those that
        answer (gRPC's round_robin), and a stream whose coordinator dies continues on another
        from the tokens received (``GenerateRequest.resume``): no token twice, none missing.
        ``num_coordinators``: how many coordinators a cluster started here runs (the agents
        join each). ``keepalive_time`` / ``keepalive_timeout``: while a call is open the
        connection is pinged every ``keepalive_time`` seconds, and one unanswered for
        ``keepalive_timeout`` is given up: a coordinator that froze (or whose host vanished)
        costs a stream at most about their sum before it continues on another."""
        address = None if isinstance(ray_address, _Omitted) else ray_address
        launcher = launcher or ("local" if isinstance(ray_address, _Omitted) else "ray")
        if launcher not in config.LAUNCHERS:
            known = ", ".join(config.LAUNCHERS)
            raise ValueError(f"unknown launcher {launcher!r} (known: {known})")
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
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0, got {connect_timeout!r}")
        if not isinstance(num_coordinators, int) or num_coordinators < 1:
            raise ValueError(
                f"num_coordinators must be a positive integer, got {num_coordinators!r}"
            )
        if not (keepalive_time > 0 and keepalive_timeout > 0):
            raise ValueError(
                f"keepalive_time and keepalive_timeout must be > 0, got {keepalive_time!r} "
                f"and {keepalive_timeout!r}"
            )
        if coordinator is not None:
            # Malformed addresses fail here, not at the first call.
            coordinator = targets.describe_checked(coordinator)
        if coordinator is None:
            from omni_rpc import launchers

            engine, model = launchers.resolve_engine(engine, model)
        self.engine = engine
        self.model = model
        self.num_nodes = num_nodes
        self.load_balancing_strategy = load_balancing_strategy
        self.health_check_interval = health_check_interval
        self.max_retries = max_retries
        self.memory_buffer_gb = memory_buffer_gb
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.keepalive_time = keepalive_time
        self.keepalive_timeout = keepalive_timeout
        self.startup_timeout = startup_timeout or config.STARTUP_TIMEOUT_S.get(engine or "", 60.0)
        self.security = ChannelSecurity(
            token=token or os.environ.get("OMNI_TOKEN") or None, tls=tls or TlsFiles()
        )
        self._started: Cluster | None = None
        self._ready = coordinator is not None
        self._http_url = http_url
        # Whether this orchestrator has ever been connected to its coordinator: until then a
        # request waits at most connect_timeout for a connection (see _connect).
        self._reached = False
        reachable_at = coordinator or ""
        if coordinator is None:
            assert engine is not None and model is not None
            self._started = launchers.start_cluster(
                launchers.ClusterPlan(
                    num_nodes=num_nodes,
                    strategy=load_balancing_strategy,
                    health_check_interval=health_check_interval,
                    max_retries=max_retries,
                    engine=engine,
                    model=model,
                    launcher=launcher,
                    agent_args=[*agent_args, *_engine_flags(engine, memory_buffer_gb)],
                    coordinator_args=coordinator_args,
                    gpus=gpus,
                    ray_address=address,
                    ray_resources=dict(ray_resources or launchers.ray_actors.DEFAULT_RESOURCES),
                    ray_max_restarts=ray_max_restarts,
                    http_listen=config.SDK_HTTP_LISTEN,
                    cpu_cores=cpu_cores,
                    coordinators=num_coordinators,
                ),
                self.startup_timeout,
            )
            self._reached = True  # it listens: its port file is written
            coordinator = self._started.coordinator
            reachable_at = self._started.reachable_at
            if self._started.ray_agents is not None:
                # Ray's coordinator listens beyond loopback, so it was started with tokens.
                self.security = ChannelSecurity(token=self._started.processes.tokens.get("admin"))
        remember_coordinator(reachable_at, self.security.token)
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

    @property
    def cluster(self) -> LocalCluster | None:
        """The local processes of the cluster this orchestrator started (None: it did not)."""
        return self._started.processes if self._started is not None else None

    @property
    def http_url(self) -> str | None:
        """The base URL of the cluster's HTTP front door, OpenAI-compatible
        (``http://HOST:PORT/v1``: the openai client's ``base_url``): set for a cluster this
        orchestrator started, else what ``http_url=`` said (None)."""
        if self._started is not None and self._started.processes.http_url:
            return self._started.processes.http_url
        return self._http_url

    @property
    def ray_agents(self) -> RayAgents | None:
        """The Ray actors of the cluster this orchestrator started on Ray, if it did."""
        return self._started.ray_agents if self._started is not None else None

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
        return self._aio_channel()[2]

    def _aio_channel(
        self,
    ) -> tuple[
        asyncio.AbstractEventLoop, grpc.aio.Channel, coordinator_pb2_grpc.CoordinatorAsyncStub
    ]:
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            target, options = targets.client_channel_target(self.coordinator)
            channel = self.security.aio_channel(
                target,
                [*options, *config.client_keepalive(self.keepalive_time, self.keepalive_timeout)],
            )
            self._aio = (loop, channel, coordinator_pb2_grpc.CoordinatorStub(channel))
        return self._aio

    async def _connect(self, bound_s: float) -> None:
        """Wait up to ``bound_s`` for a connection to a coordinator never reached before;
        CoordinatorUnreachableError naming its address when none comes."""
        channel = self._aio_channel()[1]
        try:
            await asyncio.wait_for(channel.channel_ready(), bound_s)
        except TimeoutError:
            raise CoordinatorUnreachableError(self.coordinator, bound_s) from None
        self._reached = True

    # -- generation ------------------------------------------------------------------------

    def stream(
        self,
        prompt: Prompt,
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        stream_interval: int | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream one generation as deltas.

        ``stream_interval``: the fewest tokens per delta (the last may have fewer); None takes
        the coordinator's default (``--stream-interval``, 1 unless set otherwise).
        ``inputs``: media inputs (any call takes it), ``Media(mime_type, data)`` or
        ``(mime_type, data)`` tuples, e.g. ``[("audio/wav", wav_bytes)]``: routed only to nodes
        whose model takes them (INVALID_ARGUMENT when none does).
        ``modalities``: the outputs asked for, e.g. ``["text", "audio"]`` (any call takes it):
        media items arrive whole, once each even across a failover, in
        ``GenerationDelta.outputs`` and ``GenerationResult.outputs`` (``MediaOutput``).
        ``affinity_key``: requests with the same key prefer the same node (any call takes it;
        a user or chat session id): ``consistent_hash`` routes by it, ``cache_aware`` takes
        it as a hint.

        While the coordinator is unreachable (restarting, say), a call that has received
        nothing yet waits and is retried with backoff until its deadline; failover between
        nodes is the coordinator's job. A coordinator never reached yet is waited for at most
        ``connect_timeout``.
        """
        request = build_request(prompt, max_retries, sampling)
        return self._stream(request, timeout, stream_interval)

    def stream_chat(
        self,
        messages: ChatMessages,
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        stream_interval: int | None = None,
        **sampling: Any,
    ) -> AsyncGenerator[GenerationDelta, None]:
        """Stream the assistant's reply to a chat as deltas; ``messages`` in OpenAI's shape,
        ``[{"role": "user", "content": "Hi"}]`` (content may be a list of text parts). The
        serving node renders the chat with its model's chat template. Parts may be media
        (``omni_rpc.sdk.chat``: image_url with a data: URL, input_audio, or raw audio/image/
        video bytes). Options as ``stream()``; TypeError or ValueError for malformed messages,
        before any traffic."""
        request = build_chat_request(messages, max_retries, sampling)
        return self._stream(request, timeout, stream_interval)

    async def _stream(
        self,
        request: generate_pb2.GenerateRequest,
        timeout: float | None,
        stream_interval: int | None,
    ) -> AsyncGenerator[GenerationDelta, None]:
        if stream_interval is not None:
            request.stream_interval = stream_interval
        await self._ensure_ready()
        budget = timeout or self.timeout
        deadline = time.monotonic() + budget
        if not self._reached:
            await self._connect(min(self.connect_timeout, budget))
        backoff = Backoff(config.RETRY_BACKOFF_BASE_S, config.RETRY_BACKOFF_CAP_S)
        # Media pieces of items not complete yet, by index (the coordinator relays an item's
        # pieces only once it is whole, so a retried call never repeats a complete one).
        partial: dict[int, list[bytes]] = {}
        # What this call has received: where a continuation on another coordinator starts.
        received = Received(request)
        while True:
            channel, stub = self._aio_channel()[1:]
            call = stub.Generate(
                request, timeout=max(0.0, deadline - time.monotonic()), wait_for_ready=True
            )
            try:
                async for response in call:
                    received.add(response)
                    media = _media_items(response, partial)
                    yield GenerationDelta(
                        outputs=media,
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
                if received.finished:
                    # The whole output is here; the coordinator went away before its status
                    # (frozen, say): nothing to continue, nothing to report.
                    return
                # The coordinator went away (not its verdict): any coordinator continues the
                # stream from what was received, each token exactly once. Unless the channel
                # went away: closed by aclose() or close(), the call must end.
                closed = self._aio is None or self._aio[1] is not channel
                if closed or not _coordinator_unreachable(exc) or time.monotonic() >= deadline:
                    raise GenerationError(
                        exc.code(), exc.details() or "", request.request_id
                    ) from None
                if received.any:
                    received.resume(request)
                    partial.clear()  # an item cut short is produced again, whole
            finally:
                call.cancel()
            await backoff.sleep(deadline - time.monotonic())

    async def generate_one(
        self,
        prompt: Prompt,
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        stream_interval: int | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """Generate for one prompt and return the whole result."""
        return await _collect(
            self.stream(
                prompt, max_retries, timeout=timeout, stream_interval=stream_interval, **sampling
            )
        )

    async def chat(
        self,
        messages: ChatMessages,
        max_retries: int | None = None,
        *,
        timeout: float | None = None,
        stream_interval: int | None = None,
        **sampling: Any,
    ) -> GenerationResult:
        """The assistant's whole reply to a chat (see ``stream_chat``)::

        result = await orch.chat(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            max_tokens=32, temperature=0.0,
        )
        """
        return await _collect(
            self.stream_chat(
                messages, max_retries, timeout=timeout, stream_interval=stream_interval, **sampling
            )
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
        """Cluster statistics as a plain dict: num_nodes, healthy_nodes, unhealthy_nodes,
        load_distribution and health_stats, then the coordinator's totals."""
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
        if self._started is not None:
            self._started.stop()
            self._started = None

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
