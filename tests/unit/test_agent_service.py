"""The node agent's Generate handler (node_agent/service.py) and ``coalesce``, in process.

The handler runs against the real simulated engine (on virtual time, so its time to first
token and inter-token latency cost nothing) or a scripted engine, with a fake ServicerContext
whose ``abort`` raises as gRPC's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import NoReturn, cast

import grpc
import pytest

from node_agent.engine import (
    Delta,
    Engine,
    EngineError,
    EngineLoad,
    EngineOverloaded,
    EngineRequest,
)
from node_agent.engines.sim import SimConfig, SimEngine, simulate, word
from node_agent.service import NodeAgentService, coalesce
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from tests.unit.clock import VirtualClock

NODE_ID = "node-a"
CAP = 1000
PROMPT = "the quick brown fox"

Response = generate_pb2.GenerateResponse
Context = grpc.aio.ServicerContext[node_agent_pb2.AgentRequest, generate_pb2.GenerateResponse]


class Aborted(Exception):
    """What the fake context's abort raises (gRPC raises its own exception there)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    def __init__(self) -> None:
        self.aborts: list[tuple[grpc.StatusCode, str]] = []

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()
    ) -> NoReturn:
        self.aborts.append((code, details))
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None

    def as_grpc(self) -> Context:
        return cast(Context, self)


def client_id(engine_id: str) -> str:
    """The client's request_id in an engine's id (``engine_request_id``: id-attempt-n)."""
    return engine_id.rsplit("-", 2)[0]


class SpyEngine(SimEngine):
    """The simulated engine, recording the aborts the agent asks for (by the client's
    request_id in ``aborts``, by the engine's own in ``engine_aborts``) and the engine ids of
    the requests it was given."""

    def __init__(self, cfg: SimConfig) -> None:
        super().__init__(cfg)
        self.aborts: list[str] = []
        self.engine_aborts: list[str] = []
        self.engine_ids: list[str] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        self.engine_ids.append(request.request_id)
        async for delta in super().generate(request):
            yield delta

    async def abort(self, request_id: str) -> None:
        # Only ids the engine was given: never the client's own.
        assert request_id in self.engine_ids, request_id
        self.aborts.append(client_id(request_id))
        self.engine_aborts.append(request_id)
        await super().abort(request_id)


class ScriptedEngine(Engine):
    """Yields the given deltas (all ready at once), then raises ``error`` if given."""

    kind = "scripted"

    def __init__(self, deltas: list[Delta], error: Exception | None = None) -> None:
        super().__init__()
        self.deltas = deltas
        self.error = error
        self.aborts: list[str] = []
        self.requests: list[EngineRequest] = []

    async def start(self) -> None:
        pass

    async def generate(self, request: EngineRequest) -> AsyncIterator[Delta]:
        self.requests.append(request)
        for delta in self.deltas:
            yield delta
        if self.error is not None:
            raise self.error

    async def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)

    def is_healthy(self) -> bool:
        return True

    def load(self) -> EngineLoad:
        return EngineLoad()

    @property
    def capacity(self) -> int:
        return 1

    async def stop(self) -> None:
        pass


@pytest.fixture
async def engine(clock: VirtualClock) -> SpyEngine:
    eng = SpyEngine(SimConfig(ttft_ms=0.0, itl_ms=1.0))
    await eng.start()
    return eng


@pytest.fixture
def service(engine: SpyEngine) -> NodeAgentService:
    return NodeAgentService(engine, NODE_ID, max_tokens_cap=CAP)


def first_message(
    prompt: str = PROMPT,
    max_tokens: int = 12,
    request_id: str = "req-1",
    attempt: int = 0,
    **sampling: object,
) -> node_agent_pb2.AgentRequest:
    request = generate_pb2.GenerateRequest(
        request_id=request_id,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
    )
    return node_agent_pb2.AgentRequest(generate=request, attempt=attempt)


async def feed(
    *messages: node_agent_pb2.AgentRequest,
) -> AsyncIterator[node_agent_pb2.AgentRequest]:
    for message in messages:
        yield message


def start(
    service: NodeAgentService, *messages: node_agent_pb2.AgentRequest
) -> tuple[AsyncGenerator[Response, None], FakeContext]:
    ctx = FakeContext()
    stream = service.Generate(feed(*messages), ctx.as_grpc())
    return cast(AsyncGenerator[Response, None], stream), ctx


async def run(
    service: NodeAgentService, *messages: node_agent_pb2.AgentRequest
) -> tuple[list[Response], Aborted | None]:
    """All responses of one call, and how it was aborted (None: it ended normally)."""
    stream, ctx = start(service, *messages)
    responses: list[Response] = []
    try:
        async for response in stream:
            responses.append(response)
    except Aborted as exc:
        assert ctx.aborts == [(exc.code, exc.details)]
        return responses, exc
    assert ctx.aborts == []
    return responses, None


def tokens(responses: list[Response]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def text(responses: list[Response]) -> str:
    return "".join(r.text for r in responses)


# -- refusals before the engine is asked --------------------------------------------------------


async def test_first_message_must_carry_generate(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    for messages in [(node_agent_pb2.AgentRequest(attempt=1),), ()]:
        responses, aborted = await run(service, *messages)
        assert responses == []
        assert aborted is not None
        assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT
        assert aborted.details == "the first AgentRequest must carry `generate`"
    assert engine.load().started == 0
    assert service.in_flight == 0


async def test_draining_refuses_new_requests(service: NodeAgentService, engine: SpyEngine) -> None:
    service.draining = True
    responses, aborted = await run(service, first_message())
    assert responses == []
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.UNAVAILABLE
    assert aborted.details == "node node-a is draining"
    assert engine.load().started == 0
    assert service.in_flight == 0


async def test_unhealthy_engine_refuses_new_requests(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    engine.set_fault("dead")
    responses, aborted = await run(service, first_message())
    assert responses == []
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.UNAVAILABLE
    assert aborted.details == "engine of node node-a is not serving"
    assert engine.load().started == 0


async def test_an_engine_not_started_yet_refuses(clock: VirtualClock) -> None:
    service = NodeAgentService(SimEngine(SimConfig(ttft_ms=0.0, itl_ms=1.0)), NODE_ID, CAP)
    _, aborted = await run(service, first_message())
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (first_message(top_p=0.0), "sampling.top_p"),
        (first_message(temperature=-1.0), "sampling.temperature"),
        (first_message(top_k=-2), "sampling.top_k"),
        (first_message(max_tokens=0), "sampling.max_tokens"),
        (first_message(max_tokens=CAP + 1), "sampling.max_tokens"),
        (first_message(stop=[""]), "sampling.stop"),
        (first_message(prompt=""), "prompt"),
        (first_message(request_id="r" * 257), "request_id"),
    ],
)
async def test_invalid_requests_are_invalid_argument(
    service: NodeAgentService, engine: SpyEngine, message: node_agent_pb2.AgentRequest, field: str
) -> None:
    responses, aborted = await run(service, message)
    assert responses == []
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT
    assert aborted.details.startswith(f"{field}: ")
    assert engine.load().started == 0
    assert service.in_flight == 0


async def test_the_agents_own_token_cap_applies(service: NodeAgentService) -> None:
    _, aborted = await run(service, first_message(max_tokens=CAP + 1))
    assert aborted is not None
    assert aborted.details == f"sampling.max_tokens: must be <= {CAP} (the server cap), got 1001"
    responses, aborted = await run(service, first_message(max_tokens=CAP))
    assert aborted is None
    assert len(tokens(responses)) == CAP


async def test_media_the_engine_does_not_take_is_refused(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    engine.input_modalities = ("audio",)
    message = first_message()
    message.generate.inputs.add(mime_type="image/png", data=b"\x89PNG")
    responses, aborted = await run(service, message)
    assert responses == []
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.INVALID_ARGUMENT
    assert aborted.details == (
        f"inputs: model {engine.model!r} does not take image input (it takes: text, audio)"
    )
    assert engine.load().started == 0


# -- streams ------------------------------------------------------------------------------------


async def test_full_stream_is_the_engines_deterministic_output(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    expected = simulate(PROMPT, max_tokens=12, seed=7)
    responses, aborted = await run(service, first_message(max_tokens=12, seed=7, attempt=3))
    assert aborted is None
    assert tokens(responses) == expected.token_ids
    assert text(responses) == expected.text
    assert all(r.request_id == "req-1" for r in responses)
    assert all(r.node_id == NODE_ID for r in responses)
    assert all(r.attempt == 3 for r in responses)
    last = responses[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (4, 12)
    assert all(r.finish_reason == "" for r in responses[:-1])
    assert all(not r.HasField("usage") for r in responses[:-1])
    load = engine.load()
    assert (load.started, load.finished, load.aborted, load.running) == (1, 1, 0, 0)
    assert engine.aborts == []
    assert service.in_flight == 0


async def test_attempt_defaults_to_one(service: NodeAgentService) -> None:
    responses, _ = await run(service, first_message(max_tokens=3))
    assert {r.attempt for r in responses} == {1}


async def test_seed_changes_the_output(service: NodeAgentService) -> None:
    a, _ = await run(service, first_message(seed=1))
    b, _ = await run(service, first_message(seed=2))
    assert tokens(a) == simulate(PROMPT, max_tokens=12, seed=1).token_ids
    assert tokens(a) != tokens(b)


async def test_stop_string_ends_the_stream(service: NodeAgentService) -> None:
    full = simulate(PROMPT, max_tokens=20)
    stop = word(full.token_ids[6]).strip()
    expected = simulate(PROMPT, max_tokens=20, stop=[stop])
    assert expected.finish_reason == "stop"
    responses, aborted = await run(service, first_message(max_tokens=20, stop=[stop]))
    assert aborted is None
    assert tokens(responses) == expected.token_ids
    assert text(responses) == expected.text
    assert stop not in text(responses)
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].usage.completion_tokens == len(expected.token_ids)


@pytest.mark.parametrize("k", [1, 5, 11])
async def test_resume_continues_exactly_after_the_delivered_tokens(
    service: NodeAgentService, k: int
) -> None:
    undisturbed, _ = await run(service, first_message(max_tokens=12, seed=3))
    full_tokens, full_text = tokens(undisturbed), text(undisturbed)
    message = first_message(max_tokens=12, seed=3, attempt=2)
    message.resume.token_ids.extend(full_tokens[:k])
    message.resume.text = "".join(word(t) for t in full_tokens[:k])
    responses, aborted = await run(service, message)
    assert aborted is None
    assert tokens(responses) == full_tokens[k:]
    assert message.resume.text + text(responses) == full_text
    last = responses[-1]
    assert last.finish_reason == "length"
    # Usage counts the whole generation, not just this attempt's part.
    assert last.usage.completion_tokens == 12
    assert {r.attempt for r in responses} == {2}


async def test_resume_after_the_last_token_only_finishes(service: NodeAgentService) -> None:
    full = simulate(PROMPT, max_tokens=4)
    message = first_message(max_tokens=4)
    message.resume.token_ids.extend(full.token_ids)
    message.resume.text = full.text
    responses, aborted = await run(service, message)
    assert aborted is None
    assert len(responses) == 1
    assert list(responses[0].token_ids) == []
    assert responses[0].text == ""
    assert responses[0].finish_reason == "length"
    assert responses[0].usage.completion_tokens == 4


async def test_resume_of_a_token_id_prompt(service: NodeAgentService) -> None:
    request = generate_pb2.GenerateRequest(
        request_id="ids",
        prompt_token_ids=[5, 6, 7],
        sampling=generate_pb2.SamplingParams(max_tokens=8),
    )
    full = simulate(prompt_token_ids=[5, 6, 7], max_tokens=8)
    message = node_agent_pb2.AgentRequest(
        generate=request,
        resume=generate_pb2.Resume(
            token_ids=full.token_ids[:3], text="".join(word(t) for t in full.token_ids[:3])
        ),
    )
    responses, _ = await run(service, message)
    assert tokens(responses) == full.token_ids[3:]
    assert responses[-1].usage.prompt_tokens == 3


# -- engine errors ------------------------------------------------------------------------------


async def test_engine_overloaded_is_resource_exhausted() -> None:
    engine = ScriptedEngine([], EngineOverloaded("engine full: 4 running"))
    service = NodeAgentService(engine, NODE_ID, CAP)
    responses, aborted = await run(service, first_message())
    assert responses == []
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert aborted.details == "engine full: 4 running"
    assert service.in_flight == 0


async def test_sim_engine_full_is_resource_exhausted(clock: VirtualClock) -> None:
    engine = SpyEngine(SimConfig(ttft_ms=0.0, itl_ms=1.0, max_concurrency=1, max_queue=0))
    await engine.start()
    service = NodeAgentService(engine, NODE_ID, CAP)
    holder, _ = start(service, first_message(max_tokens=CAP, request_id="holder"))
    await anext(holder)  # running: the one slot is taken
    responses, aborted = await run(service, first_message(request_id="refused"))
    assert responses == []
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert aborted.details.startswith("engine full: 1 running, 0 waiting")
    assert engine.load().rejected == 1
    await holder.aclose()
    assert engine.aborts == ["holder"]
    assert service.in_flight == 0


async def test_engine_error_is_internal() -> None:
    engine = ScriptedEngine([], EngineError("cuda error"))
    service = NodeAgentService(engine, NODE_ID, CAP)
    _, aborted = await run(service, first_message())
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.INTERNAL
    assert aborted.details == "engine failure: cuda error"
    assert service.in_flight == 0


async def test_sim_failing_requests_is_internal(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    engine.set_fault("fail_requests")
    _, aborted = await run(service, first_message())
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.INTERNAL
    assert aborted.details == ("engine failure: injected failure: the engine fails every request")
    assert engine.load().failed == 1


async def test_engine_error_mid_stream_delivers_what_was_ready_first() -> None:
    deltas = [Delta(text=f" t{i}", token_ids=[i]) for i in range(3)]
    engine = ScriptedEngine(deltas, EngineError("wedged"))
    service = NodeAgentService(engine, NODE_ID, CAP)
    responses, aborted = await run(service, first_message())
    assert tokens(responses) == [0, 1, 2]
    assert text(responses) == " t0 t1 t2"
    assert aborted is not None
    assert aborted.code == grpc.StatusCode.INTERNAL
    assert aborted.details == "engine failure: wedged"
    # The engine ended the request itself: nothing to abort.
    assert engine.aborts == []


# -- the consumer goes away -----------------------------------------------------------------------


async def test_consumer_stopping_early_aborts_the_request_in_the_engine(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    loop = asyncio.get_running_loop()
    stream, ctx = start(service, first_message(max_tokens=CAP, request_id="gone"))
    first = await anext(stream)
    assert first.token_ids
    assert service.in_flight == 1
    assert engine.load().running == 1
    # Still in flight: wait_idle gives up after its timeout (10 ms of virtual time).
    before = loop.time()
    assert not await service.wait_idle(0.01)
    assert loop.time() - before == pytest.approx(0.01)
    await stream.aclose()
    assert engine.aborts == ["gone"]
    load = engine.load()
    assert (load.running, load.aborted, load.finished, load.failed) == (0, 1, 0, 0)
    assert load.generated_tokens < CAP
    assert service.in_flight == 0
    assert ctx.aborts == []
    before = loop.time()
    assert await service.wait_idle(1.0)
    assert loop.time() == before  # at once
    assert await service.wait_idle(0)  # idle: True even with no time to wait


async def test_cancelling_one_of_two_calls_sharing_a_request_id_spares_the_other(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    # The client chooses request_id: two concurrent calls may share one. The engine aborts by
    # id, so the agent gives it an id of its own per attempt, or one cancel would end both.
    doomed, _ = start(service, first_message(max_tokens=50, request_id="same"))
    spared, _ = start(service, first_message(max_tokens=50, request_id="same", attempt=2))
    assert (await anext(doomed)).token_ids
    first = await anext(spared)
    await doomed.aclose()
    rest = [r async for r in spared]
    received = [first, *rest]
    expected = simulate(PROMPT, max_tokens=50)
    assert tokens(received) == expected.token_ids
    assert text(received) == expected.text
    assert received[-1].finish_reason == "length"
    assert all(r.request_id == "same" for r in received)  # the client's id is echoed
    assert engine.aborts == ["same"]
    doomed_id, spared_id = engine.engine_ids
    assert engine.engine_aborts == [doomed_id]
    assert doomed_id != spared_id
    assert doomed_id.startswith("same-1-") and spared_id.startswith("same-2-")
    load = engine.load()
    assert (load.aborted, load.finished, load.running) == (1, 1, 0)


async def test_each_attempt_gets_its_own_engine_id(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    for _ in range(3):
        _, aborted = await run(service, first_message(max_tokens=2, request_id="again"))
        assert aborted is None
    assert len(set(engine.engine_ids)) == 3
    assert all(i.startswith("again-1-") for i in engine.engine_ids)


async def test_wait_idle_wakes_when_the_last_request_ends(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    loop = asyncio.get_running_loop()
    one, _ = start(service, first_message(max_tokens=50, request_id="one"))
    two, _ = start(service, first_message(max_tokens=50, request_id="two"))
    await anext(one)
    await anext(two)
    assert service.in_flight == 2
    waiter = asyncio.create_task(service.wait_idle(100.0))
    start_time = loop.time()
    async for _ in one:
        pass
    assert service.in_flight == 1
    await asyncio.sleep(0.001)
    assert not waiter.done()
    async for _ in two:
        pass
    assert service.in_flight == 0
    assert await waiter
    assert loop.time() - start_time < 1.0  # woken, not timed out (virtual seconds)
    assert engine.aborts == []


async def test_a_finished_stream_is_not_aborted(
    service: NodeAgentService, engine: SpyEngine
) -> None:
    stream, _ = start(service, first_message(max_tokens=3))
    received = [r async for r in stream]
    await stream.aclose()
    assert tokens(received) == simulate(PROMPT, max_tokens=3).token_ids
    assert engine.aborts == []
    assert engine.load().finished == 1


# -- coalesce -----------------------------------------------------------------------------------


def delta(i: int, finish: str | None = None) -> Delta:
    return Delta(text=f" w{i}", token_ids=[i], finish_reason=finish, completion_tokens=i + 1)


async def test_coalesce_merges_deltas_that_are_ready_together() -> None:
    async def ready() -> AsyncIterator[Delta]:
        for i in range(10):
            yield delta(i, "length" if i == 9 else None)

    out = [d async for d in coalesce(ready())]
    assert len(out) == 1
    assert out[0].token_ids == list(range(10))
    assert out[0].text == "".join(f" w{i}" for i in range(10))
    assert out[0].finish_reason == "length"
    assert out[0].completion_tokens == 10


async def test_coalesce_passes_paced_deltas_one_by_one(clock: VirtualClock) -> None:
    async def paced() -> AsyncIterator[Delta]:
        for i in range(5):
            await asyncio.sleep(0.01)
            yield delta(i)

    out = [d async for d in coalesce(paced())]
    assert [d.token_ids for d in out] == [[0], [1], [2], [3], [4]]


async def test_fast_engine_slow_consumer_gets_fewer_larger_messages(
    service: NodeAgentService, clock: VirtualClock
) -> None:
    expected = simulate(PROMPT, max_tokens=60)
    stream, _ = start(service, first_message(max_tokens=60))
    responses = []
    async for response in stream:
        responses.append(response)
        await asyncio.sleep(0.005)  # five inter-token latencies per message
    assert tokens(responses) == expected.token_ids
    assert text(responses) == expected.text
    assert 1 < len(responses) < 60 // 3
    assert max(len(r.token_ids) for r in responses) >= 4
    assert responses[-1].finish_reason == "length"
    assert responses[-1].usage.completion_tokens == 60


async def test_coalesce_reraises_an_error_after_delivering_what_was_ready() -> None:
    async def failing() -> AsyncIterator[Delta]:
        for i in range(3):
            yield delta(i)
        raise EngineError("gpu fell off the bus")

    received: list[Delta] = []
    with pytest.raises(EngineError, match="gpu fell off the bus"):
        async for d in coalesce(failing()):
            received.append(d)
    assert [d.token_ids for d in received] == [[0, 1, 2]]


async def test_coalesce_error_after_paced_deltas(clock: VirtualClock) -> None:
    async def failing() -> AsyncIterator[Delta]:
        yield delta(0)
        await asyncio.sleep(0.01)
        yield delta(1)
        raise EngineError("late failure")

    received: list[list[int]] = []
    with pytest.raises(EngineError, match="late failure"):
        async for d in coalesce(failing()):
            received.append(d.token_ids)
    assert received == [[0], [1]]


async def test_coalesce_error_before_any_delta() -> None:
    async def failing() -> AsyncIterator[Delta]:
        raise EngineOverloaded("full")
        yield delta(0)  # pragma: no cover

    with pytest.raises(EngineOverloaded, match="full"):
        async for _ in coalesce(failing()):
            pass  # pragma: no cover


async def test_coalesce_abandons_and_closes_the_source_when_the_consumer_stops(
    clock: VirtualClock,
) -> None:
    events: list[str] = []

    async def endless() -> AsyncIterator[Delta]:
        try:
            i = 0
            while True:
                yield delta(i)
                i += 1
                await asyncio.sleep(0.01)
        finally:
            events.append("source closed")

    async def abandon() -> None:
        events.append("abandon")

    stream = coalesce(endless(), abandon)
    first = await anext(stream)
    assert first.token_ids == [0]
    assert events == []
    await stream.aclose()
    # Abandoned while the engine still has the request, then closed.
    assert events == ["abandon", "source closed"]


async def test_coalesce_does_not_abandon_a_finished_stream() -> None:
    events: list[str] = []

    async def short() -> AsyncIterator[Delta]:
        try:
            yield delta(0, "length")
        finally:
            events.append("source closed")

    async def abandon() -> None:
        events.append("abandon")

    out = [d async for d in coalesce(short(), abandon)]
    assert [d.token_ids for d in out] == [[0]]
    assert events == ["source closed"]


class ClosableSource:
    """An engine stream that is not an async generator: cancelling a pending ``__anext__``
    does not end it, only ``aclose`` does (as with an engine's own output iterator)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.position = 0

    def __aiter__(self) -> ClosableSource:
        return self

    async def __anext__(self) -> Delta:
        if self.position:
            await asyncio.sleep(0.01)
        self.position += 1
        return delta(self.position - 1)

    async def aclose(self) -> None:
        self.events.append("source closed")


async def test_coalesce_closes_a_source_that_is_not_a_generator(clock: VirtualClock) -> None:
    events: list[str] = []

    async def abandon() -> None:
        events.append("abandon")

    stream = coalesce(ClosableSource(events), abandon)
    assert (await anext(stream)).token_ids == [0]
    assert (await anext(stream)).token_ids == [1]
    await stream.aclose()
    assert events == ["abandon", "source closed"]


async def test_coalesce_holds_output_until_the_stream_interval(clock: VirtualClock) -> None:
    async def paced() -> AsyncIterator[Delta]:
        for i in range(8):
            await asyncio.sleep(0.01)
            yield delta(i, "length" if i == 7 else None)

    out = [d async for d in coalesce(paced(), interval=3)]
    # Every message but the last has at least three tokens; the last one ends the stream.
    assert [d.token_ids for d in out] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert out[-1].finish_reason == "length"


async def test_coalesce_delivers_held_output_before_an_error(clock: VirtualClock) -> None:
    async def failing() -> AsyncIterator[Delta]:
        for i in range(4):
            await asyncio.sleep(0.01)
            yield delta(i)
        raise EngineError("late failure")

    received: list[list[int]] = []
    with pytest.raises(EngineError, match="late failure"):
        async for d in coalesce(failing(), interval=3):
            received.append(d.token_ids)
    assert received == [[0, 1, 2], [3]]


async def test_stream_interval_on_generate(service: NodeAgentService) -> None:
    message = first_message(max_tokens=20)
    message.generate.stream_interval = 6
    responses, aborted = await run(service, message)
    assert aborted is None
    assert tokens(responses) == simulate(PROMPT, max_tokens=20).token_ids
    assert [len(r.token_ids) for r in responses] == [6, 6, 6, 2]
