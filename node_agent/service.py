"""The NodeAgent gRPC service: turns a bidirectional Generate stream into an engine request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import grpc

from node_agent.engine import Delta, Engine, EngineError, EngineOverloaded, EngineRequest
from omni_rpc import config
from omni_rpc.logging import get_logger
from omni_rpc.v1 import generate_pb2, node_agent_pb2, node_agent_pb2_grpc, node_pb2
from omni_rpc.validation import InvalidRequest, validate_request

log = get_logger("node_agent.service")

_END = object()


async def coalesce(
    deltas: AsyncIterator[Delta], abandon: Callable[[], Awaitable[None]] | None = None
) -> AsyncGenerator[Delta, None]:
    """Yield the deltas of ``deltas``, merging those that are ready at the same time.

    A pump task reads the engine as fast as it produces; each message the consumer sends
    takes everything queued so far. No delta waits for another: a slow consumer just gets
    fewer, larger messages (the message count, not the token count, is what costs).
    ``abandon`` is awaited when the consumer stops before the engine's stream has ended
    (client gone, deadline): while the engine still has the request, before it is closed.
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
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            assert isinstance(item, Delta)
            merged = item
            while not queue.empty():
                nxt = queue.get_nowait()
                if not isinstance(nxt, Delta):
                    # Deliver what we have, then the end or the error.
                    yield merged
                    if isinstance(nxt, Exception):
                        raise nxt
                    return
                merged.merge(nxt)
            yield merged
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
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} is draining")
        if not self.engine.is_healthy():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"engine of node {self.node_id} is not serving"
            )
        try:
            sampling = validate_request(request, max_tokens_cap=self.max_tokens_cap)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        engine_request = EngineRequest(
            request_id=request.request_id,
            sampling=sampling,
            prompt=request.prompt,
            prompt_token_ids=tuple(request.prompt_token_ids),
            resume_token_ids=tuple(first.resume.token_ids),
            resume_text=first.resume.text,
        )
        attempt = first.attempt or 1
        bound = log.bind(request_id=request.request_id, node_id=self.node_id, attempt=attempt)
        self.in_flight += 1
        self._idle.clear()
        finished = False

        async def abandon() -> None:
            # Client gone or deadline passed: nothing may keep running.
            await self.engine.abort(request.request_id)

        try:
            async with contextlib.aclosing(
                coalesce(self.engine.generate(engine_request), abandon)
            ) as deltas:
                async for delta in deltas:
                    response = generate_pb2.GenerateResponse(
                        request_id=request.request_id,
                        text=delta.text,
                        token_ids=delta.token_ids,
                        node_id=self.node_id,
                        attempt=attempt,
                    )
                    if delta.finish_reason is not None:
                        finished = True
                        response.finish_reason = delta.finish_reason
                        response.usage.prompt_tokens = delta.prompt_tokens
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
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def GetLoad(
        self,
        request: node_agent_pb2.GetLoadRequest,
        context: grpc.aio.ServicerContext[node_agent_pb2.GetLoadRequest, node_pb2.NodeLoad],
    ) -> node_pb2.NodeLoad:
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
        )


__all__ = ["NodeAgentService", "coalesce", "config"]
