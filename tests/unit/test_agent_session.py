"""The agent's side of NodeAgent.Session (node_agent/session.py), over a real gRPC server.

Each test serves a ``NodeAgentService`` on 127.0.0.1 (through ``servers.new_server``, so with
DecodeGuard in front, as the agent serves it) and talks to it with ``NodeAgentStub.Session``.
Tests wait on outputs and on the agent's idle event, never on sleeps; the engine runs in real
time with latencies of a millisecond or two, and every wait has a safety time-out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from node_agent.engine import Delta, Engine, EngineLoad, EngineRequest
from node_agent.engines.sim import SimConfig, simulate, word
from node_agent.service import NodeAgentService
from omni_rpc import servers
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_agent_pb2_grpc, node_pb2
from tests.unit.test_agent_service import SpyEngine

NODE_ID = "node-a"
CAP = 1000
PROMPT = "the quick brown fox"
# Safety net for every wait: a test that needs it has failed.
TIMEOUT_S = 10.0

Output = node_agent_pb2.StreamOutput


def code(status: grpc.StatusCode) -> int:
    value: int = status.value[0]
    return value


class LockstepEngine(Engine):
    """The simulated engine's output, one token per request per ``step``: every request makes
    its token in the same loop iteration, as the requests of one batch do in a real engine."""

    kind = "lockstep"

    def __init__(self) -> None:
        super().__init__()
        self._gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked = 0
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        pass

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        s = request.sampling
        full = simulate(request.prompt, max_tokens=s.max_tokens, seed=s.seed)
        for position, token in enumerate(full.token_ids):
            await self._park()
            last = position + 1 == len(full.token_ids)
            yield Delta(
                text=word(token),
                token_ids=[token],
                finish_reason=full.finish_reason if last else None,
                prompt_tokens=full.prompt_tokens,
                completion_tokens=position + 1,
            )

    async def _park(self) -> None:
        gate = self._gate
        async with self._changed:
            self._parked += 1
            self._changed.notify_all()
        await gate

    async def step(self, requests: int) -> None:
        """Wait until ``requests`` requests wait for the next step, then let them all go."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._parked == requests)
        gate, self._gate = self._gate, asyncio.get_running_loop().create_future()
        self._parked = 0
        gate.set_result(None)

    async def abort(self, request_id: str) -> None:
        pass

    def is_healthy(self) -> bool:
        return True

    def load(self) -> EngineLoad:
        return EngineLoad()

    @property
    def capacity(self) -> int:
        return 64

    async def stop(self) -> None:
        pass


class SessionClient:
    """One Session call, with every output it received, by stream id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.responses: list[node_agent_pb2.SessionResponse] = []
        self.outputs: dict[int, list[Output]] = defaultdict(list)
        self.loads: list[node_pb2.NodeLoad] = []

    async def start(self, *starts: node_agent_pb2.SessionStart) -> None:
        await self.call.write(node_agent_pb2.SessionRequest(starts=starts))

    async def cancel(self, *stream_ids: int) -> None:
        await self.call.write(node_agent_pb2.SessionRequest(cancels=stream_ids))

    async def read(self) -> node_agent_pb2.SessionResponse:
        """The next message with outputs (load reports alone are kept in ``loads``)."""
        while True:
            async with asyncio.timeout(TIMEOUT_S):
                response = await self.call.read()
            assert response is not grpc.aio.EOF, "the session ended"  # type: ignore[attr-defined]
            assert isinstance(response, node_agent_pb2.SessionResponse)
            if response.HasField("load"):
                self.loads.append(response.load)
            assert response.outputs or response.HasField("load"), "an empty SessionResponse"
            if response.outputs:
                break
        self.responses.append(response)
        for output in response.outputs:
            self.outputs[output.stream_id].append(output)
        return response

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.read()

    def ended(self, stream_id: int) -> bool:
        got = self.outputs.get(stream_id)
        if not got:
            return False
        return bool(got[-1].finish_reason or got[-1].error_code)

    async def finish(self, *stream_ids: int) -> None:
        await self.until(lambda: all(self.ended(i) for i in stream_ids))

    async def running(self, *stream_ids: int) -> None:
        """Wait until each stream produced output (so the engine runs it)."""
        await self.until(lambda: all(i in self.outputs for i in stream_ids))

    async def status(self) -> tuple[grpc.StatusCode, str]:
        """How the call ended, once every message before the status has been read (gRPC
        delivers the status only after them)."""
        async with asyncio.timeout(TIMEOUT_S):
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await self.call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    pass
            return await self.call.code(), await self.call.details()

    def tokens(self, stream_id: int) -> list[int]:
        return [t for o in self.outputs[stream_id] for t in o.token_ids]

    def text(self, stream_id: int) -> str:
        return "".join(o.text for o in self.outputs[stream_id])

    def last(self, stream_id: int) -> Output:
        return self.outputs[stream_id][-1]


def start(
    stream_id: int,
    max_tokens: int = 12,
    *,
    prompt: str = PROMPT,
    timeout_s: float = 0.0,
    attempt: int = 0,
    stream_interval: int | None = None,
    **sampling: Any,
) -> node_agent_pb2.SessionStart:
    request = generate_pb2.GenerateRequest(
        request_id=f"req-{stream_id}",
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
        stream_interval=stream_interval,
    )
    return node_agent_pb2.SessionStart(
        stream_id=stream_id,
        request=node_agent_pb2.AgentRequest(generate=request, attempt=attempt),
        timeout_s=timeout_s,
    )


@pytest.fixture
async def engine() -> Engine:
    eng = SpyEngine(SimConfig(ttft_ms=2.0, itl_ms=1.0))
    await eng.start()
    return eng


@pytest.fixture
def agent(engine: Engine) -> NodeAgentService:
    return NodeAgentService(engine, NODE_ID, max_tokens_cap=CAP)


@contextlib.asynccontextmanager
async def serving(agent: NodeAgentService) -> AsyncIterator[grpc.aio.Channel]:
    """``agent`` served as omni-agent serves it, and a channel to it."""
    server = servers.new_server()
    node_agent_pb2_grpc.add_NodeAgentServicer_to_server(agent, server)
    port = servers.bind(server, "127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def open_session(channel: grpc.aio.Channel) -> SessionClient:
    stub: node_agent_pb2_grpc.NodeAgentAsyncStub = node_agent_pb2_grpc.NodeAgentStub(channel)
    return SessionClient(stub.Session())  # type: ignore[call-arg]  # writes come later


@pytest.fixture
async def channel(agent: NodeAgentService) -> AsyncIterator[grpc.aio.Channel]:
    async with serving(agent) as chan:
        yield chan


@pytest.fixture
async def session(channel: grpc.aio.Channel) -> AsyncIterator[SessionClient]:
    client = open_session(channel)
    yield client
    client.call.cancel()


def session_tasks() -> list[asyncio.Task[Any]]:
    """The tasks of the agent's sessions still alive (readers, requests, deadlines)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").startswith("CoordinatorSession.")
    ]


async def idle(agent: NodeAgentService) -> None:
    assert await agent.wait_idle(TIMEOUT_S)
    assert agent.in_flight == 0


# -- outputs ------------------------------------------------------------------------------------


async def test_many_concurrent_requests_on_one_session_are_exact(
    agent: NodeAgentService, session: SessionClient
) -> None:
    cases = {i: (f"prompt {i % 7}", 5 + i % 13, i % 5) for i in range(1, 41)}
    await session.start(*(start(i, n, prompt=p, seed=seed) for i, (p, n, seed) in cases.items()))
    await session.finish(*cases)
    for i, (prompt, max_tokens, seed) in cases.items():
        expected = simulate(prompt, max_tokens=max_tokens, seed=seed)
        assert session.tokens(i) == expected.token_ids
        assert session.text(i) == expected.text
        last = session.last(i)
        assert last.finish_reason == "length"
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, max_tokens)
        earlier = session.outputs[i][:-1]
        assert all(o.finish_reason == "" and not o.HasField("usage") for o in earlier)
        assert all(o.error_code == 0 for o in session.outputs[i])
    # Outputs travel together: far fewer messages than outputs.
    assert len(session.responses) < sum(len(o) for o in session.outputs.values())
    await idle(agent)


async def test_cancelling_one_of_two_requests_sharing_a_request_id_spares_the_other(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient
) -> None:
    # Two streams, one client request_id: the engine aborts by id, so each gets its own.
    doomed, spared = start(1, 200), start(2, 200)
    spared.request.generate.request_id = doomed.request.generate.request_id = "same"
    await session.start(doomed, spared)
    await session.running(1, 2)
    await session.cancel(1)
    await session.finish(2)
    expected = simulate(PROMPT, max_tokens=200)
    assert session.tokens(2) == expected.token_ids
    assert session.text(2) == expected.text
    assert session.last(2).finish_reason == "length"
    assert not session.ended(1)
    await idle(agent)
    assert engine.aborts == ["same"]
    doomed_id, spared_id = engine.engine_ids
    assert engine.engine_aborts == [doomed_id] and doomed_id != spared_id
    assert (engine.load().aborted, engine.load().finished) == (1, 1)


async def test_requests_that_advance_together_share_one_message() -> None:
    engine = LockstepEngine()
    agent = NodeAgentService(engine, NODE_ID, max_tokens_cap=CAP)
    async with serving(agent) as channel:
        client = open_session(channel)
        await client.start(*(start(i, 3, seed=i) for i in (1, 2, 3)))
        for position in range(3):
            await engine.step(3)
            response = await client.read()
            assert sorted(o.stream_id for o in response.outputs) == [1, 2, 3]
            for output in response.outputs:
                full = simulate(PROMPT, max_tokens=3, seed=output.stream_id)
                assert list(output.token_ids) == [full.token_ids[position]]
                assert output.finish_reason == ("length" if position == 2 else "")
        await idle(agent)
        client.call.cancel()


async def test_stop_string_and_token_id_prompts(
    agent: NodeAgentService, session: SessionClient
) -> None:
    full = simulate(PROMPT, max_tokens=20)
    stop = word(full.token_ids[6]).strip()
    ids = start(2, 8)
    ids.request.generate.prompt = ""
    ids.request.generate.prompt_token_ids.extend([5, 6, 7])
    await session.start(start(1, 20, stop=[stop]), ids)
    await session.finish(1, 2)
    expected = simulate(PROMPT, max_tokens=20, stop=[stop])
    assert session.tokens(1) == expected.token_ids
    assert session.text(1) == expected.text
    assert session.last(1).finish_reason == "stop"
    assert session.tokens(2) == simulate(prompt_token_ids=[5, 6, 7], max_tokens=8).token_ids
    assert session.last(2).usage.prompt_tokens == 3


@pytest.mark.parametrize("k", [1, 5, 11, 12])
async def test_resume_continues_exactly(session: SessionClient, k: int) -> None:
    full = simulate(PROMPT, max_tokens=12, seed=3)
    resumed = start(1, 12, seed=3, attempt=2)
    resumed.request.resume.token_ids.extend(full.token_ids[:k])
    resumed.request.resume.text = "".join(word(t) for t in full.token_ids[:k])
    await session.start(resumed)
    await session.finish(1)
    assert session.tokens(1) == full.token_ids[k:]
    assert resumed.request.resume.text + session.text(1) == full.text
    # Usage counts the whole generation, not just this attempt's part.
    assert session.last(1).usage.completion_tokens == 12
    assert session.last(1).finish_reason == "length"


# -- stream_interval ------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "max_tokens"), [(4, 18), (5, 20), (50, 10), (1, 6)])
async def test_stream_interval_holds_output_until_enough_tokens(
    session: SessionClient, interval: int, max_tokens: int
) -> None:
    await session.start(start(1, max_tokens, stream_interval=interval), start(2, max_tokens))
    await session.finish(1, 2)
    expected = simulate(PROMPT, max_tokens=max_tokens)
    assert session.tokens(1) == expected.token_ids
    assert session.text(1) == expected.text
    assert all(len(o.token_ids) >= interval for o in session.outputs[1][:-1])
    assert session.last(1).finish_reason == "length"
    if interval > max_tokens:
        assert len(session.outputs[1]) == 1
    # Unset: every token as soon as it exists.
    assert session.tokens(2) == expected.token_ids


@pytest.mark.parametrize("interval", [3, 7])
async def test_stream_interval_on_direct_generate(channel: grpc.aio.Channel, interval: int) -> None:
    stub: node_agent_pb2_grpc.NodeAgentAsyncStub = node_agent_pb2_grpc.NodeAgentStub(channel)
    first = start(1, 20, stream_interval=interval).request
    responses = [r async for r in stub.Generate(iter([first]))]
    expected = simulate(PROMPT, max_tokens=20)
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    assert all(len(r.token_ids) >= interval for r in responses[:-1])
    assert responses[-1].finish_reason == "length"


async def test_stream_interval_zero_is_invalid(session: SessionClient) -> None:
    await session.start(start(1, stream_interval=0))
    await session.finish(1)
    assert session.last(1).error_code == code(grpc.StatusCode.INVALID_ARGUMENT)
    assert session.last(1).error_message == "stream_interval: must be >= 1, got 0"


# -- cancels, deadlines, the session's end ----------------------------------------------------


async def test_cancel_aborts_the_request_in_the_engine(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient
) -> None:
    await session.start(start(1, CAP), start(2, CAP))
    await session.running(1, 2)
    await session.cancel(1, 999)  # an unknown id is ignored
    await session.until(lambda: agent.in_flight == 1)
    assert engine.aborts == ["req-1"]
    assert engine.load().aborted == 1
    # The session goes on: the other request runs on, a new one completes.
    await session.start(start(3, 4))
    await session.finish(3)
    assert session.tokens(3) == simulate(PROMPT, max_tokens=4).token_ids
    assert not session.ended(2)
    await session.cancel(2)
    await idle(agent)
    assert sorted(engine.aborts) == ["req-1", "req-2"]
    load = engine.load()
    assert (load.running, load.aborted, load.finished) == (0, 2, 1)
    # Nothing ended a cancelled stream: no finish, no error was sent for it.
    for stream_id in (1, 2):
        assert not any(o.finish_reason or o.error_code for o in session.outputs[stream_id])
        got = session.tokens(stream_id)
        assert got == simulate(PROMPT, max_tokens=CAP).token_ids[: len(got)]


async def test_deadline_aborts_with_deadline_exceeded(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient
) -> None:
    await session.start(start(1, CAP, timeout_s=0.05), start(2, 10, timeout_s=60.0))
    await session.finish(1, 2)
    last = session.last(1)
    assert last.error_code == code(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert last.error_message == "deadline exceeded"
    assert not last.finish_reason
    assert engine.aborts == ["req-1"]
    assert session.last(2).finish_reason == "length"
    await idle(agent)
    load = engine.load()
    assert (load.running, load.aborted, load.finished) == (0, 1, 1)
    assert load.generated_tokens < CAP


@pytest.mark.parametrize("how", ["cancel", "done_writing"])
async def test_the_session_ending_aborts_every_request_on_it(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient, how: str
) -> None:
    await session.start(*(start(i, CAP, timeout_s=60.0) for i in (1, 2, 3)))
    await session.running(1, 2, 3)
    assert agent.in_flight == 3
    assert not await agent.wait_idle(0.0)
    if how == "cancel":
        session.call.cancel()
    else:
        await session.call.done_writing()
    await idle(agent)
    assert sorted(engine.aborts) == ["req-1", "req-2", "req-3"]
    load = engine.load()
    assert (load.running, load.waiting, load.aborted, load.finished) == (0, 0, 3, 0)
    assert session_tasks() == []
    if how == "done_writing":
        assert await session.status() == (grpc.StatusCode.OK, "")


# -- failures end one request only -----------------------------------------------------------------


async def test_an_invalid_request_fails_alone(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient
) -> None:
    no_generate = node_agent_pb2.SessionStart(stream_id=3, request=node_agent_pb2.AgentRequest())
    media = start(5)
    media.request.generate.inputs.add(mime_type="text/plain", data=b"hello")
    await session.start(
        start(1), start(2, top_p=0.0), no_generate, start(4, max_tokens=CAP + 1), media, start(6)
    )
    await session.finish(1, 2, 3, 4, 5, 6)
    invalid = code(grpc.StatusCode.INVALID_ARGUMENT)
    assert len(session.outputs[2]) == 1
    assert session.last(2).error_message == "sampling.top_p: must be in (0, 1], got 0.0"
    assert not session.tokens(2)
    assert session.last(3).error_message == "SessionStart.request must carry `generate`"
    assert session.last(4).error_message.startswith("sampling.max_tokens: must be <= 1000")
    assert session.last(5).error_message.startswith("inputs[0].mime_type: must be image/*")
    assert {session.last(i).error_code for i in (2, 3, 4, 5)} == {invalid}
    expected = simulate(PROMPT, max_tokens=12).token_ids
    assert session.tokens(1) == session.tokens(6) == expected
    assert engine.load().started == 2
    await idle(agent)


async def test_a_duplicate_stream_id_is_refused_while_the_first_runs(
    agent: NodeAgentService, session: SessionClient
) -> None:
    await session.start(start(1, 30, stream_interval=30))
    await session.start(start(1, 5))
    await session.until(lambda: bool(session.outputs[1]))
    assert session.outputs[1][0].error_code == code(grpc.StatusCode.INVALID_ARGUMENT)
    assert session.outputs[1][0].error_message == "stream_id 1 is already in use on this session"
    # The first request with that id is untouched.
    await session.until(lambda: len(session.outputs[1]) == 2)
    assert session.tokens(1) == simulate(PROMPT, max_tokens=30).token_ids
    assert session.last(1).finish_reason == "length"
    await idle(agent)


async def test_draining_refuses_new_starts(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient
) -> None:
    await session.start(start(1, 200))
    await session.running(1)
    agent.draining = True
    await session.start(start(2))
    await session.until(lambda: session.ended(2))
    assert session.last(2) == Output(
        stream_id=2,
        error_code=code(grpc.StatusCode.UNAVAILABLE),
        error_message="node node-a is draining",
    )
    # Drain waits for the request already running on the session, which completes.
    assert await agent.wait_idle(TIMEOUT_S)
    await session.finish(1)
    assert session.tokens(1) == simulate(PROMPT, max_tokens=200).token_ids
    assert engine.load().started == 1


async def test_engine_failures_end_their_request_only(
    agent: NodeAgentService, engine: SpyEngine, session: SessionClient
) -> None:
    engine.set_fault("fail_requests")
    await session.start(start(1))
    await session.finish(1)
    assert session.last(1).error_code == code(grpc.StatusCode.INTERNAL)
    assert session.last(1).error_message == (
        "engine failure: injected failure: the engine fails every request"
    )
    engine.set_fault("none")
    await session.start(start(2, CAP))
    await session.running(2)
    # The engine dies mid-stream: what was ready is delivered, then the error ends it.
    engine.set_fault("dead")
    await session.finish(2)
    assert session.last(2).error_code == code(grpc.StatusCode.INTERNAL)
    assert session.last(2).error_message == ("engine failure: simulated engine stopped mid-request")
    got = session.tokens(2)
    assert got == simulate(PROMPT, max_tokens=CAP).token_ids[: len(got)]
    await session.start(start(3))
    await session.finish(3)
    assert session.last(3).error_code == code(grpc.StatusCode.UNAVAILABLE)
    assert session.last(3).error_message == "engine of node node-a is not serving"
    await idle(agent)


async def test_a_full_engine_is_resource_exhausted() -> None:
    engine = SpyEngine(SimConfig(ttft_ms=1.0, itl_ms=1.0, max_concurrency=1, max_queue=0))
    await engine.start()
    agent = NodeAgentService(engine, NODE_ID, max_tokens_cap=CAP)
    async with serving(agent) as channel:
        client = open_session(channel)
        await client.start(start(1, CAP))
        await client.running(1)
        await client.start(start(2))
        await client.finish(2)
        assert client.last(2).error_code == code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert client.last(2).error_message.startswith("engine full: 1 running, 0 waiting")
        await client.cancel(1)
        await idle(agent)
        client.call.cancel()


async def test_a_message_that_does_not_parse_ends_the_session(
    agent: NodeAgentService, engine: SpyEngine, channel: grpc.aio.Channel
) -> None:
    """DecodeGuard refuses it (INVALID_ARGUMENT) from the session's reader; the requests on
    the session are aborted as on any other end."""
    raw = channel.stream_stream(
        "/omni.v1.NodeAgent/Session",
        request_serializer=None,
        response_deserializer=node_agent_pb2.SessionResponse.FromString,
    )
    client = SessionClient(raw())  # type: ignore[call-arg]
    await client.call.write(
        node_agent_pb2.SessionRequest(starts=[start(1, CAP)]).SerializeToString()
    )
    await client.running(1)
    await client.call.write(b"\xff\xff\xff")
    status, details = await client.status()
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request message does not parse")
    await idle(agent)
    assert engine.aborts == ["req-1"]
    assert session_tasks() == []


class MisbehavingEngine(SpyEngine):
    """Fails in ways the Engine contract does not allow: ``mode`` says which."""

    def __init__(self, mode: str) -> None:
        super().__init__(SimConfig(ttft_ms=1.0, itl_ms=1.0))
        self.mode = mode

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        if self.mode == "unfinished":
            yield Delta(text=" a", token_ids=[1])
            return
        if self.mode == "raises":
            raise RuntimeError("a bug")
        async for delta in super().generate(request):
            yield delta

    async def abort(self, request_id: str) -> None:
        await super().abort(request_id)
        if self.mode == "abort_fails":
            raise RuntimeError("engine is dead")


@pytest.mark.parametrize(
    ("mode", "status", "details"),
    [
        ("unfinished", grpc.StatusCode.INTERNAL, "engine stream ended unfinished"),
        ("raises", grpc.StatusCode.UNKNOWN, "RuntimeError: a bug"),
    ],
)
async def test_an_engine_breaking_its_contract_ends_that_request_only(
    mode: str, status: grpc.StatusCode, details: str
) -> None:
    engine = MisbehavingEngine(mode)
    await engine.start()
    agent = NodeAgentService(engine, NODE_ID, max_tokens_cap=CAP)
    async with serving(agent) as channel:
        client = open_session(channel)
        await client.start(start(1), start(2))
        await client.finish(1, 2)
        for stream_id in (1, 2):
            assert client.last(stream_id).error_code == code(status)
            assert client.last(stream_id).error_message == details
        engine.mode = "fine"
        await client.start(start(3, 4))
        await client.finish(3)
        assert client.tokens(3) == simulate(PROMPT, max_tokens=4).token_ids
        await idle(agent)
        client.call.cancel()


async def test_a_failing_abort_still_ends_the_request() -> None:
    engine = MisbehavingEngine("abort_fails")
    await engine.start()
    agent = NodeAgentService(engine, NODE_ID, max_tokens_cap=CAP)
    async with serving(agent) as channel:
        client = open_session(channel)
        await client.start(start(1, CAP))
        await client.running(1)
        await client.cancel(1)
        await idle(agent)
        assert engine.aborts == ["req-1"]
        assert engine.load().aborted == 1
        await client.start(start(2, 4))
        await client.finish(2)
        assert client.last(2).finish_reason == "length"
        client.call.cancel()


# -- load reports --------------------------------------------------------------------------------


async def next_load(client: SessionClient) -> node_pb2.NodeLoad:
    """The next load report on a session that carries no requests of its own."""
    while True:
        async with asyncio.timeout(TIMEOUT_S):
            response = await client.call.read()
        assert isinstance(response, node_agent_pb2.SessionResponse)
        if response.HasField("load"):
            return response.load


async def test_every_session_hears_of_the_requests_of_the_others(
    agent: NodeAgentService, channel: grpc.aio.Channel
) -> None:
    """Two coordinators: each knows only its own requests, the agent's reports give the rest."""
    first, second = open_session(channel), open_session(channel)
    try:
        await second.call.write(node_agent_pb2.SessionRequest())
        assert (await next_load(second)).requests == 0
        await first.start(start(1, 200), start(2, 200))
        load = await next_load(second)
        while load.requests < 2:  # the two starts may be reported one at a time
            load = await next_load(second)
        assert load.requests == 2 and load.node_id == NODE_ID
        await first.cancel(1, 2)
        while load.requests:
            load = await next_load(second)
        await idle(agent)
    finally:
        first.call.cancel()
        second.call.cancel()
