"""The coordinator's side of the multiplexed agent session, against a scripted Session call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from coordinator.node_client import NodeCallError, OutputOverflow
from coordinator.session import AgentSession, SessionAttempt
from omni_rpc.v1 import generate_pb2, node_agent_pb2


class ScriptedCall:
    """A Session call: records what the coordinator writes, yields the frames a test feeds."""

    def __init__(self) -> None:
        self.written: list[node_agent_pb2.SessionRequest] = []
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = False
        self.wrote = asyncio.Event()
        self._holding = False

    async def write(self, request: node_agent_pb2.SessionRequest) -> None:
        self.written.append(request)
        self.wrote.set()

    async def read(self) -> Any:
        # The reader asks for the next frame only once it has handed out the previous one.
        if self._holding:
            self.frames.task_done()
        item = await self.frames.get()
        self._holding = True
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def send(self, *outputs: node_agent_pb2.StreamOutput) -> None:
        self.frames.put_nowait(node_agent_pb2.SessionResponse(outputs=outputs))

    def break_with(self, code: grpc.StatusCode, details: str) -> None:
        empty = grpc.aio.Metadata()
        self.frames.put_nowait(grpc.aio.AioRpcError(code, empty, empty, details, None))

    async def starts(self, count: int) -> list[node_agent_pb2.SessionStart]:
        while sum(len(w.starts) for w in self.written) < count:
            self.wrote.clear()
            await asyncio.wait_for(self.wrote.wait(), 5)
        return [s for w in self.written for s in w.starts]

    async def cancels(self, count: int) -> list[int]:
        while sum(len(w.cancels) for w in self.written) < count:
            self.wrote.clear()
            await asyncio.wait_for(self.wrote.wait(), 5)
        return [c for w in self.written for c in w.cancels]


async def delivered(call: ScriptedCall) -> None:
    """Return once the session's reader has handed every fed frame to its attempts."""
    await asyncio.wait_for(call.frames.join(), 5)


class Opener:
    def __init__(self) -> None:
        self.calls: list[ScriptedCall] = []

    def __call__(self) -> ScriptedCall:
        self.calls.append(ScriptedCall())
        return self.calls[-1]


def first(request_id: str, stream_interval: int = 0, attempt: int = 1) -> Any:
    request = generate_pb2.GenerateRequest(request_id=request_id, prompt="p")
    if stream_interval:
        request.stream_interval = stream_interval
    return node_agent_pb2.AgentRequest(generate=request, attempt=attempt)


def out(stream_id: int, *tokens: int, finish: str = "", **fields: Any) -> Any:
    output = node_agent_pb2.StreamOutput(
        stream_id=stream_id,
        token_ids=list(tokens),
        text="".join(f" t{t}" for t in tokens),
        finish_reason=finish,
        **fields,
    )
    if finish:
        output.usage.completion_tokens = 99
    return output


async def collect(attempt: SessionAttempt) -> list[generate_pb2.GenerateResponse]:
    return [response async for response in attempt]


async def next_response(attempt: SessionAttempt) -> generate_pb2.GenerateResponse:
    return await asyncio.wait_for(anext(attempt), 5)


async def test_one_frame_feeds_every_attempt_it_names() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1")
    a = session.start(first("a"), None)
    b = session.start(first("b", attempt=2), 7.5)
    call = opener.calls[0]
    starts = await call.starts(2)
    assert [s.request.generate.request_id for s in starts] == ["a", "b"]
    assert starts[1].timeout_s == 7.5 and starts[1].request.attempt == 2
    call.send(out(a.stream_id, 1, 2, finish="length"), out(b.stream_id, 3, finish="stop"))
    ra, rb = await collect(a), await collect(b)
    assert [list(r.token_ids) for r in ra] == [[1, 2]] and ra[0].finish_reason == "length"
    assert ra[0].request_id == "a" and ra[0].node_id == "n1" and ra[0].attempt == 1
    assert rb[0].attempt == 2 and rb[0].usage.completion_tokens == 99
    assert session.open_streams == 0
    await session.close()


async def test_outputs_not_yet_taken_are_merged_into_one_response() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1")
    a = session.start(first("a"), None)
    call = opener.calls[0]
    call.send(out(a.stream_id, 1))
    call.send(out(a.stream_id, 2))
    call.send(out(a.stream_id, 3, finish="length"))
    await delivered(call)  # all three arrive before anyone reads
    responses = await collect(a)
    assert len(responses) == 1
    assert list(responses[0].token_ids) == [1, 2, 3] and responses[0].text == " t1 t2 t3"
    await session.close()


async def test_stream_interval_holds_output_until_enough_tokens() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1")
    a = session.start(first("a", stream_interval=3), None)
    call = opener.calls[0]
    reader = asyncio.ensure_future(next_response(a))
    call.send(out(a.stream_id, 1))
    call.send(out(a.stream_id, 2))
    await delivered(call)
    assert not reader.done()  # two tokens are fewer than the interval
    call.send(out(a.stream_id, 3))
    assert list((await reader).token_ids) == [1, 2, 3]
    call.send(out(a.stream_id, 4, finish="length"))  # the last message may be shorter
    assert list((await next_response(a)).token_ids) == [4]
    await session.close()


async def test_a_reader_that_stops_is_cut_off_at_the_buffer_limit() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1", max_buffered_tokens=4)
    a = session.start(first("a"), None)
    call = opener.calls[0]
    call.send(*[out(a.stream_id, t) for t in range(5)])
    assert await call.cancels(1) == [a.stream_id]
    with pytest.raises(OutputOverflow) as caught:
        await next_response(a)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_buffered_tokens=4" in caught.value.details
    assert session.open_streams == 0
    await session.close()


async def test_a_request_error_ends_that_request_after_its_output() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1")
    a = session.start(first("a"), None)
    b = session.start(first("b"), None)
    call = opener.calls[0]
    code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    call.send(out(a.stream_id, 1), out(a.stream_id, error_code=code, error_message="bad"))
    assert list((await next_response(a)).token_ids) == [1]
    with pytest.raises(NodeCallError) as caught:
        await next_response(a)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.details == "bad"
    call.send(out(b.stream_id, 2, finish="length"))  # the other request goes on
    assert [list(r.token_ids) for r in await collect(b)] == [[2]]
    await session.close()


async def test_a_broken_session_fails_every_attempt_and_the_next_start_reopens() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1")
    attempts = [session.start(first(str(i)), None) for i in range(3)]
    opener.calls[0].break_with(grpc.StatusCode.UNAVAILABLE, "connection reset")
    for attempt in attempts:
        with pytest.raises(NodeCallError) as caught:
            await next_response(attempt)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert opener.calls[0].cancelled
    again = session.start(first("x"), None)
    assert len(opener.calls) == 2
    opener.calls[1].send(out(again.stream_id, 5, finish="length"))
    assert [list(r.token_ids) for r in await collect(again)] == [[5]]
    await session.close()


async def test_cancel_tells_the_agent_and_ends_the_attempt() -> None:
    opener = Opener()
    session = AgentSession(opener, "n1")
    a = session.start(first("a"), None)
    reader = asyncio.ensure_future(next_response(a))
    await asyncio.sleep(0)
    a.cancel()
    with pytest.raises(NodeCallError) as caught:
        await reader
    assert caught.value.code == grpc.StatusCode.CANCELLED
    assert await opener.calls[0].cancels(1) == [a.stream_id]
    opener.calls[0].send(out(a.stream_id, 1))  # late output of a cancelled stream: dropped
    await session.close()


async def test_closed_session_refuses_new_attempts() -> None:
    session = AgentSession(Opener(), "n1")
    await session.close()
    with pytest.raises(NodeCallError) as caught:
        session.start(first("a"), None)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_session_refused_by_the_node_fails_its_attempts_over() -> None:
    # An agent that cannot serve sessions (too old: UNIMPLEMENTED) fails the node, not the
    # request: UNAVAILABLE, which dispatch fails over, with the real status in the details.
    opener = Opener()
    session = AgentSession(opener, "n1")
    attempt = session.start(first("a"), None)
    opener.calls[0].break_with(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    with pytest.raises(NodeCallError) as caught:
        await next_response(attempt)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "UNIMPLEMENTED" in caught.value.details and "Method not found!" in caught.value.details
    await session.close()
