"""One multiplexed ``NodeAgent.Session`` per (coordinator process, agent): the data plane.

Every attempt a coordinator process runs on an agent travels on one long-lived bidirectional
stream instead of a stream of its own: starts and cancels go down in batches, and each message
up carries the output of every request that advanced since the previous one. gRPC's cost is
per message, not per token, so this is what lets one Python process carry a GPU's worth of
streams.

Inside the process there is no task and no queue per request: one reader per session hands
each ``StreamOutput`` to its attempt's mailbox (``SessionAttempt``), which merges whatever its
consumer has not taken yet and wakes the consumer when there is enough to send
(``stream_interval`` tokens, or the end). A consumer that keeps up gets every output as soon as
it arrives; a slow one gets fewer, larger messages; one that stops reading is cut off at
``max_buffered_tokens`` (the request is cancelled on the agent, so memory stays bounded).

The session breaking (agent killed, connection lost) fails every attempt on it with the
transport's status, and dispatch fails each over and resumes it elsewhere; the next attempt on
the node opens a new session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import grpc

from coordinator.node_client import NodeCallError, OutputOverflow
from omni_rpc import config
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_pb2

# Opens the Session call on the node's channel.
OpenSession = Callable[[], Any]


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    return _STATUS_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def session_error(exc: grpc.aio.AioRpcError) -> NodeCallError:
    """What the attempts on a session that failed see.

    A failure of the session itself is the node's, never one request's (those arrive as
    outputs): UNAVAILABLE, so every attempt on it fails over, with the session's own status in
    the details (an agent too old to serve sessions says UNIMPLEMENTED, a token mismatch
    PERMISSION_DENIED; either way the request is served elsewhere and the node takes the blame).
    """
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return NodeCallError(code, details)
    return NodeCallError(
        grpc.StatusCode.UNAVAILABLE, f"the node's session failed: {code.name} {details}".strip()
    )


class SessionAttempt:
    """One attempt on a session: the mailbox its outputs land in, read as an AttemptStream."""

    __slots__ = (
        "_attempt",
        "_done",
        "_ended",
        "_error",
        "_interval",
        "_limit",
        "_node_id",
        "_pending",
        "_pending_media",
        "_pending_tokens",
        "_request_id",
        "_session",
        "_waiter",
        "stream_id",
    )

    def __init__(
        self,
        session: AgentSession,
        stream_id: int,
        request: generate_pb2.GenerateRequest,
        attempt: int,
        limit: int,
    ) -> None:
        self._session = session
        self.stream_id = stream_id
        self._request_id = request.request_id
        self._node_id = session.node_id
        self._attempt = attempt
        self._interval = request.stream_interval or 1
        # A stream interval above the limit must still be able to fill one message.
        self._limit = max(limit, self._interval)
        self._pending: list[node_agent_pb2.StreamOutput] = []
        self._pending_tokens = 0
        # Media pieces are pending: they go at once (they hold no tokens to wait for).
        self._pending_media = False
        self._ended = False  # the last output (finish or error) has arrived
        self._error: NodeCallError | None = None
        self._done = False  # the consumer has taken the last output
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the session --------------------------------------------------------------

    def push(self, output: node_agent_pb2.StreamOutput) -> None:
        if self._ended:
            return
        self._pending.append(output)
        self._pending_tokens += len(output.token_ids)
        if output.outputs:
            self._pending_media = True
        if output.finish_reason or output.error_code:
            self._ended = True
            self._session.forget(self.stream_id)
        elif self._pending_tokens > self._limit:
            # Dropped, not kept for a reader that may never come: that is the bound.
            error = OutputOverflow(self._pending_tokens, self._limit)
            self._pending, self._pending_tokens, self._pending_media = [], 0, False
            self._session.cancel(self.stream_id)
            self._fail(error)
            return
        if self._ended or self._pending_media or self._pending_tokens >= self._interval:
            self._wake()

    def fail(self, error: NodeCallError) -> None:
        """The session broke (or closed): this attempt ends with ``error``."""
        if not self._ended:
            self._fail(error)

    def _fail(self, error: NodeCallError) -> None:
        self._ended = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by dispatch (the AttemptStream interface) --------------------------------

    def __aiter__(self) -> SessionAttempt:
        return self

    async def __anext__(self) -> generate_pb2.GenerateResponse:
        while True:
            if self._pending and (
                self._ended or self._pending_media or self._pending_tokens >= self._interval
            ):
                response = self._take()
                if response is not None:
                    return response
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            await waiter

    def _take(self) -> generate_pb2.GenerateResponse | None:
        """Everything pending as one response (None when only an error was pending)."""
        outputs = self._pending
        self._pending = []
        self._pending_tokens = 0
        self._pending_media = False
        last = outputs[-1]
        if last.error_code:
            self._error = NodeCallError(status_code(last.error_code), last.error_message)
            outputs.pop()
            if not outputs:
                return None
            last = outputs[-1]
        if len(outputs) == 1:
            response = generate_pb2.GenerateResponse(
                request_id=self._request_id,
                text=last.text,
                token_ids=last.token_ids,
                outputs=last.outputs,
                node_id=self._node_id,
                attempt=self._attempt,
            )
        else:
            response = generate_pb2.GenerateResponse(
                request_id=self._request_id,
                text="".join([o.text for o in outputs]),
                token_ids=[t for o in outputs for t in o.token_ids],
                # Merged in order: a slow reader gets every piece, in one message.
                outputs=[m for o in outputs for m in o.outputs],
                node_id=self._node_id,
                attempt=self._attempt,
            )
        if last.finish_reason:
            self._done = True
            response.finish_reason = last.finish_reason
            response.usage.CopyFrom(last.usage)
        return response

    def cancel(self) -> None:
        """Stop the attempt: the agent aborts it; reading it raises CANCELLED."""
        if self._done:
            return  # the consumer already has the whole output
        self._session.cancel(self.stream_id)  # a no-op once the agent has ended it
        self._pending, self._pending_tokens, self._pending_media = [], 0, False
        self._fail(NodeCallError(grpc.StatusCode.CANCELLED, "attempt cancelled"))


def split_batch(
    batch: node_agent_pb2.SessionRequest, limit: int = config.SESSION_BATCH_BYTES
) -> list[node_agent_pb2.SessionRequest]:
    """``batch`` as messages of at most ``limit`` bytes where it can be (a start larger than
    that goes alone): starts with media inputs must not add up past what the agent receives
    (config.MAX_MESSAGE_BYTES), which would break the session and every stream on it."""
    if len(batch.starts) < 2 or batch.ByteSize() <= limit:
        return [batch]
    messages = [node_agent_pb2.SessionRequest(cancels=batch.cancels)]
    size = 0
    for start in batch.starts:
        start_bytes = start.ByteSize()
        if size and size + start_bytes > limit:
            messages.append(node_agent_pb2.SessionRequest())
            size = 0
        messages[-1].starts.append(start)
        size += start_bytes
    return messages


class AgentSession:
    """The Session stream to one agent: opened on first use, opened again after it breaks."""

    def __init__(
        self,
        open_call: OpenSession,
        node_id: str = "",
        max_buffered_tokens: int = config.MAX_BUFFERED_TOKENS,
    ) -> None:
        self._open_call = open_call
        self.node_id = node_id
        self.max_buffered_tokens = max_buffered_tokens
        self._call: Any = None
        self._streams: dict[int, SessionAttempt] = {}
        self._next_id = 0
        self._starts: list[node_agent_pb2.SessionStart] = []
        self._cancels: list[int] = []
        self._wake_writer = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Load reports that arrive on the session (see keep_open).
        self.on_load: Callable[[node_pb2.NodeLoad], None] | None = None
        self._keep_open = False

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def start(self, first: node_agent_pb2.AgentRequest, timeout_s: float | None) -> SessionAttempt:
        """Start an attempt; its outputs arrive on the returned mailbox."""
        if self._closed:
            raise NodeCallError(grpc.StatusCode.UNAVAILABLE, "node connection closed")
        if self._call is None:
            self._open()
        self._next_id += 1
        stream_id = self._next_id
        attempt = SessionAttempt(
            self, stream_id, first.generate, first.attempt or 1, self.max_buffered_tokens
        )
        self._streams[stream_id] = attempt
        self._starts.append(
            node_agent_pb2.SessionStart(
                stream_id=stream_id, request=first, timeout_s=timeout_s or 0.0
            )
        )
        self._wake_writer.set()
        return attempt

    def cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and self._call is not None:
            self._cancels.append(stream_id)
            self._wake_writer.set()

    def forget(self, stream_id: int) -> None:
        """The attempt ended on the agent's side: nothing to cancel any more."""
        self._streams.pop(stream_id, None)

    def keep_open(self) -> None:
        """Open the session now, and again SESSION_REOPEN_S after it breaks, requests or not:
        the agent reports its load on it (other coordinators' requests included)."""
        self._keep_open = True
        self._reopen()

    def _reopen(self) -> None:
        if self._call is None and not self._closed:
            self._open()

    def _open(self) -> None:
        call = self._open_call()
        self._call = call
        self._starts, self._cancels = [], []
        self._wake_writer = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._write_loop(call), name=f"session-write:{self.node_id}"),
            asyncio.create_task(self._read_loop(call), name=f"session-read:{self.node_id}"),
        ]

    async def _write_loop(self, call: Any) -> None:
        wake = self._wake_writer
        try:
            while True:
                await wake.wait()
                wake.clear()
                if not self._starts and not self._cancels:
                    continue
                batch = node_agent_pb2.SessionRequest(starts=self._starts, cancels=self._cancels)
                self._starts, self._cancels = [], []
                for message in split_batch(batch):
                    await call.write(message)
        except grpc.aio.AioRpcError as exc:
            self._broken(call, session_error(exc))
        except asyncio.InvalidStateError:  # written after the call ended: the reader reports
            pass

    async def _read_loop(self, call: Any) -> None:
        streams = self._streams
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:  # type: ignore[attr-defined]
                    error = NodeCallError(grpc.StatusCode.UNAVAILABLE, "session ended by the node")
                    break
                for output in frame.outputs:
                    attempt = streams.get(output.stream_id)
                    if attempt is not None:
                        attempt.push(output)
                if self.on_load is not None and frame.HasField("load"):
                    self.on_load(frame.load)
        except grpc.aio.AioRpcError as exc:
            error = session_error(exc)
        self._broken(call, error)

    def _broken(self, call: Any, error: NodeCallError) -> None:
        """The session is gone: every attempt on it fails; the next start opens a new one."""
        if self._call is not call:
            return
        self._call = None
        call.cancel()
        streams, self._streams = self._streams, {}
        for attempt in streams.values():
            attempt.fail(error)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks = []
        if self._keep_open and not self._closed:
            asyncio.get_running_loop().call_later(config.SESSION_REOPEN_S, self._reopen)

    async def close(self) -> None:
        self._closed = True
        call, tasks = self._call, self._tasks
        if call is not None:
            self._broken(call, NodeCallError(grpc.StatusCode.UNAVAILABLE, "node connection closed"))
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
