"""The agent's identity (node_agent/identity.py): its default node id, its incarnation, and the
interceptor that refuses calls meant for another node or incarnation, on a real in-process
server built as omni-agent builds it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node_agent.engines.sim import SimConfig, SimEngine, simulate
from node_agent.identity import (
    MISMATCH_PREFIX,
    IdentityGuard,
    default_node_id,
    mismatch,
    new_incarnation,
)
from node_agent.main import build_parser, keepalive_options
from node_agent.service import NodeAgentService
from omni_rpc import config, servers
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_agent_pb2_grpc

NODE_ID = "node-b"
INCARNATION = "1a2b3c4d5e6f7a8b"
TIMEOUT_S = 10.0

Metadata = Sequence[tuple[str, str]]


# -- the default node id ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "listen", "expected"),
    [
        (0, "127.0.0.1:0", "host-gpu0"),
        (3, "0.0.0.0:50061", "host-gpu3"),  # the GPU wins over the port
        (-1, "0.0.0.0:50061", "host-50061"),
        (-1, "[::]:7000", "host-7000"),
        (-1, "127.0.0.1:0", "host-cpu"),  # any port: the id must not depend on it
        (-1, "localhost:00", "host-cpu"),
        (-1, "unix:/tmp/agent.sock", "host-cpu"),
    ],
)
def test_default_node_id(gpu: int, listen: str, expected: str) -> None:
    assert default_node_id("host", gpu, listen) == expected


def test_incarnations_are_random_and_short() -> None:
    ids = {new_incarnation() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_keepalive_flags() -> None:
    args = build_parser().parse_args(["--coordinator", "c:1"])
    assert (args.keepalive_time, args.keepalive_timeout) == (10.0, 5.0)
    args = build_parser().parse_args(["--keepalive-time", "1", "--keepalive-timeout", "0.5"])
    assert dict(keepalive_options(args.keepalive_time, args.keepalive_timeout)) == {
        "grpc.keepalive_time_ms": 1000,
        "grpc.keepalive_timeout_ms": 500,
        "grpc.http2.ping_timeout_ms": 500,
        "grpc.http2.max_pings_without_data": 0,
    }


# -- mismatch ------------------------------------------------------------------------------------


def ident(node_id: str | None = None, incarnation: str | None = None) -> list[tuple[str, str]]:
    metadata = []
    if node_id is not None:
        metadata.append((config.NODE_ID_METADATA, node_id))
    if incarnation is not None:
        metadata.append((config.NODE_INCARNATION_METADATA, incarnation))
    return metadata


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        [("authorization", "Bearer x"), ("user-agent", "grpcurl")],
        ident(NODE_ID),
        ident(incarnation=INCARNATION),
        ident(NODE_ID, INCARNATION),
        ident("", ""),  # empty: expects nothing
    ],
)
def test_no_mismatch(metadata: Metadata | None) -> None:
    assert mismatch(NODE_ID, INCARNATION, metadata) is None


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (ident("node-a", "9f8e"), "node 'node-a' (incarnation 9f8e)"),
        (ident("node-a"), "node 'node-a'"),
        (ident(incarnation="9f8e"), "incarnation 9f8e"),
        (ident(NODE_ID, "9f8e"), "node 'node-b' (incarnation 9f8e)"),  # a restarted node-b
    ],
)
def test_mismatch_names_both(metadata: Metadata, expected: str) -> None:
    assert mismatch(NODE_ID, INCARNATION, metadata) == (
        f"node identity mismatch: this is node 'node-b' (incarnation {INCARNATION}), "
        f"the caller expected {expected}"
    )


# -- the interceptor on a real server ------------------------------------------------------------


@pytest.fixture
async def engine() -> SimEngine:
    eng = SimEngine(SimConfig(ttft_ms=1.0, itl_ms=1.0))
    await eng.start()
    return eng


@pytest.fixture
async def guard() -> IdentityGuard:
    return IdentityGuard(NODE_ID, INCARNATION)


@pytest.fixture
async def channel(engine: SimEngine, guard: IdentityGuard) -> AsyncIterator[grpc.aio.Channel]:
    """An agent served as omni-agent serves it (its interceptors and health), and a channel."""
    server = servers.new_server([guard], options=keepalive_options(10.0, 5.0))
    node_agent_pb2_grpc.add_NodeAgentServicer_to_server(
        NodeAgentService(engine, NODE_ID, max_tokens_cap=1000), server
    )
    health = servers.add_health_and_reflection(server, [config.NODE_AGENT_SERVICE])
    await servers.set_serving(health, [config.NODE_AGENT_SERVICE], True)
    port = servers.bind(server, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            yield chan
    finally:
        await server.stop(None)


def generate_request(request_id: str = "r1") -> node_agent_pb2.AgentRequest:
    return node_agent_pb2.AgentRequest(
        generate=generate_pb2.GenerateRequest(
            request_id=request_id,
            prompt="hello there",
            sampling=generate_pb2.SamplingParams(max_tokens=5),
        )
    )


async def call_each_kind(channel: grpc.aio.Channel, metadata: Metadata) -> dict[str, object]:
    """Call every method kind with ``metadata``: each one's result, or its AioRpcError."""
    agent = node_agent_pb2_grpc.NodeAgentStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    results: dict[str, object] = {}

    async def attempt(name: str, call: object) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                results[name] = await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            results[name] = exc

    async def watch() -> object:
        call = health.Watch(
            health_pb2.HealthCheckRequest(service=config.NODE_AGENT_SERVICE), metadata=metadata
        )
        try:
            return await anext(aiter(call))
        finally:
            call.cancel()

    async def generate() -> object:
        call = agent.Generate(metadata=metadata)  # type: ignore[call-arg]  # writes later
        await call.write(generate_request())
        await call.done_writing()
        return [r async for r in call]

    async def session() -> object:
        call = agent.Session(metadata=metadata)  # type: ignore[call-arg]  # writes later
        start = node_agent_pb2.SessionStart(stream_id=1, request=generate_request())
        await call.write(node_agent_pb2.SessionRequest(starts=[start]))
        try:
            while True:  # the first message with outputs (load reports may come first)
                response = await call.read()
                if not isinstance(response, node_agent_pb2.SessionResponse) or response.outputs:
                    return response
        finally:
            call.cancel()

    await attempt("Check", health.Check(health_pb2.HealthCheckRequest(), metadata=metadata))
    await attempt("GetLoad", agent.GetLoad(node_agent_pb2.GetLoadRequest(), metadata=metadata))
    await attempt("Watch", watch())
    await attempt("Generate", generate())
    await attempt("Session", session())
    return results


KINDS = ["Check", "GetLoad", "Watch", "Generate", "Session"]


@pytest.mark.parametrize(
    "metadata",
    [[], ident(NODE_ID), ident(NODE_ID, INCARNATION), ident(incarnation=INCARNATION)],
    ids=["no-keys", "same-id", "same-id-and-incarnation", "same-incarnation"],
)
async def test_calls_for_this_node_or_without_keys_are_served(
    channel: grpc.aio.Channel, engine: SimEngine, metadata: Metadata
) -> None:
    results = await call_each_kind(channel, metadata)
    assert sorted(results) == sorted(KINDS)
    errors = {k: v for k, v in results.items() if isinstance(v, grpc.aio.AioRpcError)}
    assert errors == {}
    serving = health_pb2.HealthCheckResponse.SERVING
    assert results["Check"].status == serving  # type: ignore[attr-defined]
    assert results["Watch"].status == serving  # type: ignore[attr-defined]
    assert results["GetLoad"].node_id == NODE_ID  # type: ignore[attr-defined]
    generated = results["Generate"]
    assert isinstance(generated, list)
    expected = simulate("hello there", max_tokens=5)
    assert [t for r in generated for t in r.token_ids] == expected.token_ids
    session = results["Session"]
    assert isinstance(session, node_agent_pb2.SessionResponse)
    assert session.outputs[0].stream_id == 1 and session.outputs[0].error_code == 0
    assert engine.load().started == 2  # Generate and Session reached the engine


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (ident("node-a", "9f8e7d6c"), "node 'node-a' (incarnation 9f8e7d6c)"),
        (ident("node-a"), "node 'node-a'"),
        (ident(NODE_ID, "9f8e7d6c"), "node 'node-b' (incarnation 9f8e7d6c)"),
        (ident(incarnation="9f8e7d6c"), "incarnation 9f8e7d6c"),
    ],
    ids=["other-node", "other-id", "other-incarnation", "only-incarnation"],
)
async def test_calls_for_another_node_are_refused_on_every_method_kind(
    channel: grpc.aio.Channel, engine: SimEngine, metadata: Metadata, expected: str
) -> None:
    results = await call_each_kind(channel, metadata)
    details = (
        f"{MISMATCH_PREFIX}this is node 'node-b' (incarnation {INCARNATION}), "
        f"the caller expected {expected}"
    )
    for kind in KINDS:
        error = results[kind]
        assert isinstance(error, grpc.aio.AioRpcError), (kind, error)
        assert (error.code(), error.details()) == (grpc.StatusCode.FAILED_PRECONDITION, details)
    assert engine.load().started == 0  # nothing reached the engine


async def test_refusing_handlers_are_built_once_per_method(
    channel: grpc.aio.Channel, guard: IdentityGuard
) -> None:
    stub = node_agent_pb2_grpc.NodeAgentStub(channel)
    for caller in ("node-x", "node-y", "node-x"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetLoad(
                node_agent_pb2.GetLoadRequest(), metadata=ident(caller), timeout=TIMEOUT_S
            )
        # One cached handler, yet each refusal names its own caller's expectation.
        assert str(refused.value.details()).endswith(f"the caller expected node '{caller}'")
    assert list(guard._refusing) == ["/omni.v1.NodeAgent/GetLoad"]
    # A call for this node after refusals is still served.
    load = await stub.GetLoad(
        node_agent_pb2.GetLoadRequest(), metadata=ident(NODE_ID, INCARNATION), timeout=TIMEOUT_S
    )
    assert load.node_id == NODE_ID


async def test_unknown_methods_stay_unimplemented(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/omni.v1.NodeAgent/Nope")  # type: ignore[call-arg]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(b"", metadata=ident("node-a"), timeout=TIMEOUT_S)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
