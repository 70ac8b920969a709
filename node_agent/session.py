"""The agent's side of ``NodeAgent.Session``: many requests multiplexed on one stream.

One coordinator process keeps one Session per agent. Starts and cancels arrive in batches;
each request runs as one small task that merges its engine's deltas into the session's
pending map (``stream_id -> output not sent yet``). One writer per session takes every output
that is ready and sends them all in one ``SessionResponse``: the message count, not the token
count, is what costs, so requests that advance together travel together, and a slow reader
gets fewer, larger messages instead of a queue per token.

A request's failure ends that request only (an output with ``error_code``). The stream ending
for any reason (the coordinator closing or cancelling it, the connection breaking, the server
stopping) aborts every request still on it in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from node_agent.engine import (
    ChatTurn,
    Delta,
    EngineError,
    EngineOverloaded,
    EngineRequest,
    MediaInput,
    MediaPiece,
    engine_request_id,
)
from omni_rpc import config
from omni_rpc.logging import get_logger
from omni_rpc.v1 import generate_pb2, node_agent_pb2
from omni_rpc.validation import InvalidRequest, check_modalities, validate_request

if TYPE_CHECKING:
    from node_agent.service import NodeAgentService

# Deferred: a line per aborted request, written off the event loop.
log = get_logger("node_agent.session", deferred=True)

SessionContext = grpc.aio.ServicerContext[
    node_agent_pb2.SessionRequest, node_agent_pb2.SessionResponse
]


class Refused(Exception):
    """A request the agent does not start: answered with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def stream_interval(request: generate_pb2.GenerateRequest) -> int:
    """The fewest tokens per message for ``request`` (validated to be >= 1 when set)."""
    if request.HasField("stream_interval"):
        return request.stream_interval
    return config.DEFAULT_STREAM_INTERVAL


def chat_turns(messages: Sequence[generate_pb2.ChatMessage]) -> tuple[ChatTurn, ...]:
    """A validated chat as the engine's turns: text parts are joined with newlines (as vLLM's
    OpenAI server does for models whose templates take string content); media parts go to
    the turn's ``media``, in order."""
    return tuple(
        ChatTurn(
            role=m.role,
            content="\n".join(p.text for p in m.parts if p.WhichOneof("part") == "text")
            if m.parts
            else m.content,
            media=media_inputs(p.media for p in m.parts if p.WhichOneof("part") == "media"),
        )
        for m in messages
    )


def media_inputs(media: Iterable[generate_pb2.Media]) -> tuple[MediaInput, ...]:
    return tuple(MediaInput(mime_type=m.mime_type, data=m.data) for m in media)


def admit(agent: NodeAgentService, message: node_agent_pb2.AgentRequest) -> EngineRequest:
    """The engine request for ``message`` (which carries ``generate``), or Refused: the
    checks a request passes before the engine sees it, on Generate and on a Session alike.
    Its request_id is the engine's own for this attempt (``engine_request_id``)."""
    request = message.generate
    if agent.draining:
        raise Refused(grpc.StatusCode.UNAVAILABLE, f"node {agent.node_id} is draining")
    if not agent.engine.is_healthy():
        raise Refused(grpc.StatusCode.UNAVAILABLE, f"engine of node {agent.node_id} is not serving")
    try:
        sampling = validate_request(request, max_tokens_cap=agent.max_tokens_cap)
        # Media the engine would ignore (or could not produce) is refused, never dropped.
        engine = agent.engine
        check_modalities(request, engine.input_modalities, engine.output_modalities, engine.model)
    except InvalidRequest as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
    # A resume point in the request itself (a client calling the agent directly, as it would
    # a coordinator) counts as the attempt's own; a coordinator clears it and sets the attempt's.
    resume = message.resume if message.HasField("resume") else request.resume
    return EngineRequest(
        request_id=engine_request_id(request.request_id, message.attempt or 1),
        sampling=sampling,
        prompt=request.prompt,
        prompt_token_ids=tuple(request.prompt_token_ids),
        inputs=media_inputs(request.inputs),
        messages=chat_turns(request.messages),
        resume_token_ids=tuple(resume.token_ids),
        resume_text=resume.text,
        default_max_tokens=not request.sampling.HasField("max_tokens"),
        modalities=tuple(request.modalities),
        media_items_delivered=resume.media_items_delivered,
    )


def add_media(into: Any, pieces: Sequence[MediaPiece]) -> None:
    """Append ``pieces`` to a repeated ``Media`` field (StreamOutput or GenerateResponse
    ``outputs``), in order."""
    for piece in pieces:
        into.add(
            index=piece.index,
            mime_type=piece.mime_type,
            data=piece.data,
            last_chunk=piece.last_chunk,
        )


def _code(status: grpc.StatusCode) -> int:
    value: int = status.value[0]
    return value


@dataclass(eq=False)
class _Stream:
    """One request on the session, from its start until its last output is written (or it
    is dropped: cancelled, or the session ended)."""

    stream_id: int
    request_id: str
    # The engine's id of this attempt (aborts go to it, not to the client's request_id).
    engine_id: str
    attempt: int
    interval: int
    task: asyncio.Task[None] | None = None
    deadline: asyncio.TimerHandle | None = None
    # Set when the request failed: its last output carries it.
    error: tuple[grpc.StatusCode, str] | None = None
    # Being aborted: the engine's remaining deltas are dropped.
    stopping: bool = False


class CoordinatorSession:
    """The agent's end of one coordinator process's Session (``serve`` runs it to its end)."""

    def __init__(self, agent: NodeAgentService, context: SessionContext) -> None:
        self._agent = agent
        self._engine = agent.engine
        self._context = context
        self._streams: dict[int, _Stream] = {}
        # Output not written yet, merged: at most one entry per stream whatever the writer's
        # pace. ``_ready`` holds the stream ids whose entry may be written now (in order).
        self._pending: dict[int, Delta] = {}
        self._ready: dict[int, None] = {}
        # Outputs of starts refused before they had a stream (a duplicate id must not touch
        # the pending output of the request that holds the id).
        self._refusals: list[node_agent_pb2.StreamOutput] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._expiries: set[asyncio.Task[None]] = set()
        # A load report goes with the next message (see _watch_load).
        self._load_due = True

    async def serve(self, requests: AsyncIterator[node_agent_pb2.SessionRequest]) -> None:
        reader = asyncio.create_task(self._read(requests))
        load_watch = asyncio.create_task(self._watch_load())
        try:
            await self._write_loop()
        finally:
            load_watch.cancel()
            reader.cancel()
            # Shielded: a cancelled call can end the reader first and cancel this handler
            # only then, in the middle of the clean-up, which must still run to its end.
            cleanup = asyncio.create_task(self._close(reader))
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await asyncio.wait([cleanup])
                raise
        if not reader.cancelled():
            # The reader's failure is the session's: a message that did not parse
            # (servers.UndecodableRequest) ends the call INVALID_ARGUMENT, now that no write
            # of this session is in flight.
            reader.result()

    # -- reading ---------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[node_agent_pb2.SessionRequest]) -> None:
        try:
            async for message in requests:
                # Starts first: a batch may start a request and cancel it again.
                for start in message.starts:
                    self._start(start)
                for stream_id in message.cancels:
                    await self._cancel(stream_id)
        finally:
            self._closed = True
            self._wake.set()

    def _start(self, start: node_agent_pb2.SessionStart) -> None:
        stream_id = start.stream_id
        if stream_id in self._streams:
            self._refuse(
                stream_id,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stream_id {stream_id} is already in use on this session",
            )
            return
        try:
            if start.request.WhichOneof("kind") != "generate":
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, "SessionStart.request must carry `generate`"
                )
            request = admit(self._agent, start.request)
        except Refused as exc:
            self._refuse(stream_id, exc.code, exc.details)
            return
        stream = _Stream(
            stream_id=stream_id,
            request_id=start.request.generate.request_id,
            engine_id=request.request_id,
            attempt=start.request.attempt or 1,
            interval=stream_interval(start.request.generate),
        )
        self._streams[stream_id] = stream
        self._agent.request_started()
        stream.task = asyncio.create_task(self._run(stream, request))
        if start.timeout_s > 0:
            stream.deadline = asyncio.get_running_loop().call_later(
                start.timeout_s, self._expire_soon, stream
            )

    async def _cancel(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:  # unknown or already ended and written: nothing to do
            await self._halt(stream, "cancelled")
            self._end(stream)

    # -- running a request -----------------------------------------------------------------

    async def _run(self, stream: _Stream, request: EngineRequest) -> None:
        """Pump the engine's deltas into the pending map until the request ends."""
        deltas = self._engine.generate(request)
        finished = False
        try:
            async for delta in deltas:
                finished = delta.finish_reason is not None
                self._add(stream, delta)
            if not finished:
                self._fail(stream, grpc.StatusCode.INTERNAL, "engine stream ended unfinished")
        except InvalidRequest as exc:
            self._fail(stream, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineOverloaded as exc:
            self._fail(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineError as exc:
            # A node-level failure: INTERNAL makes the coordinator fail the request over.
            self._bind(stream).warning("engine failed the request", error=str(exc))
            self._fail(stream, grpc.StatusCode.INTERNAL, f"engine failure: {exc}")
        except Exception as exc:  # a bug must end this request, not hang it or the session
            self._bind(stream).exception("request failed")
            self._fail(stream, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        finally:
            if stream.deadline is not None:
                stream.deadline.cancel()
            # Closing the engine's iterator is what ends the request inside the engine (an
            # async generator is closed already when cancelling the task ran through it).
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()

    def _add(self, stream: _Stream, delta: Delta) -> None:
        if stream.stopping:
            return  # aborted: nothing after the cancel, not even the engine's "abort"
        pending = self._pending.get(stream.stream_id)
        if pending is None:
            self._pending[stream.stream_id] = pending = delta
        else:
            pending.merge(delta)
        if (
            delta.finish_reason is not None
            or len(pending.token_ids) >= stream.interval
            or delta.outputs  # media pieces go at once: they hold no tokens to wait for
        ):
            self._mark_ready(stream.stream_id)

    def _fail(self, stream: _Stream, code: grpc.StatusCode, details: str) -> None:
        if stream.stopping:
            return
        stream.error = (code, details)
        self._pending.setdefault(stream.stream_id, Delta())
        self._mark_ready(stream.stream_id)

    def _refuse(self, stream_id: int, code: grpc.StatusCode, details: str) -> None:
        self._refusals.append(
            node_agent_pb2.StreamOutput(
                stream_id=stream_id, error_code=_code(code), error_message=details
            )
        )
        self._wake.set()

    def _mark_ready(self, stream_id: int) -> None:
        self._ready[stream_id] = None
        self._wake.set()

    def _expire_soon(self, stream: _Stream) -> None:
        """The deadline timer fired: abort the request (a task, as aborting awaits)."""
        task = asyncio.create_task(self._expire(stream))
        self._expiries.add(task)
        task.add_done_callback(self._expiries.discard)

    async def _expire(self, stream: _Stream) -> None:
        assert stream.task is not None
        if stream.stopping or stream.task.done():
            return  # cancelled, or ended just before its deadline
        await self._halt(stream, "deadline exceeded")
        if self._streams.get(stream.stream_id) is stream:  # not cancelled meanwhile
            stream.stopping = False  # the task is done: only this last output is left
            self._fail(stream, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    async def _halt(self, stream: _Stream, reason: str) -> None:
        """Abort ``stream`` in the engine and wait for its task to end; its pending output is
        dropped. The abort comes first, while the engine still has the request: an engine
        may remember the abort of a request it no longer has and refuse a later one that
        reuses the id."""
        task = stream.task
        assert task is not None
        if not stream.stopping and not task.done():
            stream.stopping = True
            self._drop_pending(stream.stream_id)
            try:
                await self._engine.abort(stream.engine_id)
            except Exception as exc:  # a dead engine's may fail: the task's end still ends it
                self._bind(stream).warning("engine abort failed", error=repr(exc))
            finally:
                # Even when this wait is cancelled (the session ending): nothing may run on.
                task.cancel()
            self._bind(stream).info("request aborted", reason=reason)
        await asyncio.wait([task])

    def _end(self, stream: _Stream) -> None:
        """``stream`` is over: forget it and its pending output (idempotent)."""
        if self._streams.get(stream.stream_id) is not stream:
            return
        del self._streams[stream.stream_id]
        self._drop_pending(stream.stream_id)
        if stream.deadline is not None:
            stream.deadline.cancel()
        self._agent.request_ended()

    def _drop_pending(self, stream_id: int) -> None:
        self._pending.pop(stream_id, None)
        self._ready.pop(stream_id, None)

    def _bind(self, stream: _Stream) -> Any:
        return log.bind(
            request_id=stream.request_id,
            engine_request_id=stream.engine_id,
            node_id=self._agent.node_id,
            attempt=stream.attempt,
            stream_id=stream.stream_id,
        )

    # -- load reports ------------------------------------------------------------------------

    async def _watch_load(self) -> None:
        """Report the node's load on this session when it changed, at most every
        LOAD_REPORT_INTERVAL_S: every coordinator learns what the others put on the node (each
        knows only its own requests), soon enough to balance by it."""
        agent = self._agent
        reported: tuple[int, bool] | None = None
        while True:
            now = (agent.in_flight, agent.draining)
            if now != reported:
                reported = now
                self._load_due = True
                self._wake.set()
            await asyncio.sleep(config.LOAD_REPORT_INTERVAL_S)

    # -- writing ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Write whatever is ready, one message at a time, until the reader ends. Deltas that
        arrive during a write merge into the pending map and go in the next message."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            response, finals = self._take()
            if response.outputs or response.HasField("load"):
                await self._context.write(response)
            for stream in finals:
                self._end(stream)

    def _take(self) -> tuple[node_agent_pb2.SessionResponse, list[_Stream]]:
        """Every ready output as one response, and the streams whose last output it holds."""
        response = node_agent_pb2.SessionResponse(outputs=self._refusals)
        self._refusals = []
        finals: list[_Stream] = []
        for stream_id in self._ready:
            delta = self._pending.pop(stream_id)
            stream = self._streams[stream_id]
            if delta.token_ids or delta.text or delta.outputs or stream.error is None:
                output = response.outputs.add(
                    stream_id=stream_id, text=delta.text, token_ids=delta.token_ids
                )
                add_media(output.outputs, delta.outputs)
                if delta.finish_reason is not None:
                    output.finish_reason = delta.finish_reason
                    output.usage.prompt_tokens = delta.prompt_tokens
                    output.usage.cached_prompt_tokens = delta.cached_prompt_tokens
                    output.usage.completion_tokens = delta.completion_tokens
                    finals.append(stream)
            if stream.error is not None:
                # Its own output after the tokens that were ready: the tokens are delivered,
                # as on the direct path, and the error ends the request.
                code, details = stream.error
                response.outputs.add(
                    stream_id=stream_id, error_code=_code(code), error_message=details
                )
                finals.append(stream)
        self._ready.clear()
        if self._load_due:
            self._load_due = False
            response.load.CopyFrom(self._agent.load_report())
        return response, finals

    # -- the end ---------------------------------------------------------------------------

    async def _close(self, reader: asyncio.Task[None]) -> None:
        """Abort every request still on the session and wait for their tasks: none leaks."""
        await asyncio.wait([reader])  # no start comes in any more
        streams = list(self._streams.values())
        for stream in streams:
            if stream.deadline is not None:
                stream.deadline.cancel()
        # Deadlines being handled finish first (an abort and a task's end, both short).
        if self._expiries:
            await asyncio.wait(list(self._expiries))
        if streams:
            await asyncio.gather(*(self._halt(s, "session ended") for s in streams))
        for stream in streams:
            self._end(stream)
