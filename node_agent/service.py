"""The NodeAgent gRPC service: turns a bidirectional Generate stream into an engine request,
and serves the multiplexed Session stream (node_agent/session.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import grpc

from node_agent.engine import Delta, Engine, EngineError, EngineOverloaded
from node_agent.session import (
    CoordinatorSession,
    Refused,
    SessionContext,
    add_media,
    admit,
    stream_interval,
)
from omni_rpc import config
from omni_rpc.logging import get_logger
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_agent_pb2_grpc, node_pb2
from omni_rpc.validation import InvalidRequest

log = get_logger("node_agent.service")

_END = object()


async def coalesce(
    deltas: AsyncIterator[Delta],
    abandon: Callable[[], Awaitable[None]] | None = None,
    interval: int = config.DEFAULT_STREAM_INTERVAL,
) -> AsyncGenerator[Delta, None]:
    """Yield the deltas of ``deltas``, merging those that are ready at the same time.

    A pump task reads the engine as fast as it produces; each message the consumer sends
    takes everything queued so far. No delta waits for another: a slow consumer just gets
    fewer, larger messages (the message count, not the token count, is what costs).
    Output is held until it has ``interval`` tokens (the request's stream_interval), except
    at the end. ``abandon`` is awaited when the consumer stops before the engine's stream has
    ended (client gone, deadline): while the engine still has the request, before it is
    closed.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for delta in deltas:
                queue.put_nowait(delta)
            queue.put_nowait(_END)
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)

    task = asyncio.create_task(pump())
    merged: Delta | None = None
    try:
        while True:
            item = await queue.get()
            while True:
                if not isinstance(item, Delta):
                    # Deliver what we have, then the end or the error.
                    if merged is not None:
                        yield merged
                    if isinstance(item, Exception):
                        raise item
                    return
                if merged is None:
                    merged = item
                else:
                    merged.merge(item)
                if queue.empty():
                    break
                item = queue.get_nowait()
            if (
                merged.finish_reason is not None
                or len(merged.token_ids) >= interval
                or merged.outputs  # media pieces go at once: they hold no tokens
            ):
                yield merged
                merged = None
    finally:
        if abandon is not None and not task.done():
            # Not after the close: an engine may remember the abort of a request it no longer
            # has, and refuse a later request that reuses the id.
            await abandon()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # Closing the engine's iterator is what aborts the request inside the engine.
        aclose = getattr(deltas, "aclose", None)
        if aclose is not None:
            await aclose()


class NodeAgentService(node_agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, engine: Engine, node_id: str, max_tokens_cap: int) -> None:
        self.engine = engine
        self.node_id = node_id
        self.max_tokens_cap = max_tokens_cap
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def request_started(self) -> None:
        """Count a request in flight (on Generate or on a Session): drain waits for it."""
        self.in_flight += 1
        self._idle.clear()

    def request_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        if self._idle.is_set():
            return True  # also for timeout_s=0, which wait_for would count as a time-out
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def Generate(
        self,
        request_iterator: AsyncIterator[node_agent_pb2.AgentRequest],
        context: grpc.aio.ServicerContext[
            node_agent_pb2.AgentRequest, generate_pb2.GenerateResponse
        ],
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "generate":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first AgentRequest must carry `generate`"
            )
            return
        request = first.generate
        try:
            engine_request = admit(self, first)
        except Refused as exc:
            await context.abort(exc.code, exc.details)
            return
        attempt = first.attempt or 1
        bound = log.bind(
            request_id=request.request_id,
            engine_request_id=engine_request.request_id,
            node_id=self.node_id,
            attempt=attempt,
        )
        self.request_started()
        finished = False

        async def abandon() -> None:
            # Client gone or deadline passed: nothing may keep running.
            await self.engine.abort(engine_request.request_id)

        try:
            async with contextlib.aclosing(
                coalesce(self.engine.generate(engine_request), abandon, stream_interval(request))
            ) as deltas:
                async for delta in deltas:
                    response = generate_pb2.GenerateResponse(
                        request_id=request.request_id,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        node_id=self.node_id,
                        attempt=attempt,
                    )
                    add_media(response.outputs, delta.outputs)
                    if delta.finish_reason is not None:
                        finished = True
                        response.finish_reason = delta.finish_reason
                        response.usage.prompt_tokens = delta.prompt_tokens
                        response.usage.cached_prompt_tokens = delta.cached_prompt_tokens
                        response.usage.completion_tokens = delta.completion_tokens
                    yield response
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineOverloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineError as exc:
            # A node-level failure: INTERNAL makes the coordinator fail the call over.
            bound.warning("engine failed the request", error=str(exc))
            await context.abort(grpc.StatusCode.INTERNAL, f"engine failure: {exc}")
        finally:
            if not finished:
                # Aborted in the engine by coalesce (abandon): the call was cancelled.
                bound.info("request aborted")
            self.request_ended()

    async def Session(  # type: ignore[override]  # a coroutine: it writes with context.write
        self,
        request_iterator: AsyncIterator[node_agent_pb2.SessionRequest],
        context: SessionContext,
    ) -> None:
        await CoordinatorSession(self, context).serve(request_iterator)

    async def GetLoad(
        self,
        request: node_agent_pb2.GetLoadRequest,
        context: grpc.aio.ServicerContext[node_agent_pb2.GetLoadRequest, node_pb2.NodeLoad],
    ) -> node_pb2.NodeLoad:
        return self.load_report()

    def load_report(self) -> node_pb2.NodeLoad:
        """The node's load now, as GetLoad answers and sessions report it."""
        load = self.engine.load()
        return node_pb2.NodeLoad(
            node_id=self.node_id,
            running=load.running,
            waiting=load.waiting,
            capacity=load.capacity,
            kv_cache_usage=load.kv_cache_usage,
            started=load.started,
            finished=load.finished,
            aborted=load.aborted,
            failed=load.failed,
            engine_healthy=self.engine.is_healthy(),
            draining=self.draining,
            generated_tokens=load.generated_tokens,
            rejected=load.rejected,
            requests=self.in_flight,
            prompt_tokens=load.prompt_tokens,
            cached_prompt_tokens=load.cached_prompt_tokens,
        )


__all__ = ["NodeAgentService", "coalesce", "config"]
