"""The SDK's side of a coordinator going away, against an in-process Coordinator over loopback:
how the call ended decides whether the stream continues elsewhere (from its resume point),
ends as it is, or fails."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from node_agent.engines.sim import simulate, word
from omni_rpc import config, servers
from omni_rpc.sdk import DistributedOrchestrator, GenerationError
from omni_rpc.v1 import coordinator_pb2_grpc, generate_pb2

PROMPT = "a stream whose coordinator goes away"
MAX_TOKENS = 12


class GoingAway(coordinator_pb2_grpc.CoordinatorServicer):
    """Streams the simulated engine's output from the request's resume point on, one token a
    message. Its first call ends with ``code`` after ``cut_after`` tokens (after the final
    message when ``cut_after`` is MAX_TOKENS), marked final or not."""

    def __init__(self, code: grpc.StatusCode, cut_after: int, final: bool = False) -> None:
        self.code = code
        self.cut_after = cut_after
        self.final = final
        self.requests: list[generate_pb2.GenerateRequest] = []

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        copy = generate_pb2.GenerateRequest()
        copy.CopyFrom(request)
        self.requests.append(copy)
        first = len(self.requests) == 1
        whole = simulate(request.prompt, max_tokens=request.sampling.max_tokens, seed=5)
        for i in range(len(request.resume.token_ids), len(whole.token_ids)):
            response = generate_pb2.GenerateResponse(
                request_id=request.request_id or "named-by-the-coordinator",
                text=word(whole.token_ids[i]),
                token_ids=[whole.token_ids[i]],
                node_id="n1",
                attempt=1,
            )
            if i == len(whole.token_ids) - 1:
                response.finish_reason = whole.finish_reason
                response.usage.prompt_tokens = whole.prompt_tokens
                response.usage.completion_tokens = len(whole.token_ids)
            yield response
            if first and i + 1 == self.cut_after:
                if self.final:
                    context.set_trailing_metadata(((config.FINAL_ERROR_METADATA, "1"),))
                await context.abort(self.code, "the coordinator went away")

    # Not called by these tests.
    async def GetStats(self, request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")

    async def ListNodes(self, request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")

    async def DrainNode(self, request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")


async def run(servicer: GoingAway) -> tuple[list[int], str, str | None]:
    server = servers.new_server()
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = servers.bind(server, "127.0.0.1:0")
    await server.start()
    orch = DistributedOrchestrator(coordinator=f"127.0.0.1:{port}", timeout=20)
    try:
        tokens: list[int] = []
        text = ""
        finish = None
        async for delta in orch.stream(PROMPT, max_tokens=MAX_TOKENS, seed=5):
            tokens += delta.token_ids
            text += delta.text
            finish = delta.finish_reason or finish
        return tokens, text, finish
    finally:
        await orch.aclose()
        await server.stop(None)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
async def test_a_coordinator_gone_mid_stream_is_continued_from_the_resume_point(
    code: grpc.StatusCode,
) -> None:
    """UNAVAILABLE (the connection broke) and CANCELLED without omni-final (the server shut
    down as the call arrived) are the coordinator going away, not its verdict."""
    servicer = GoingAway(code, cut_after=5)
    tokens, text, finish = await run(servicer)
    whole = simulate(PROMPT, max_tokens=MAX_TOKENS, seed=5)
    assert tokens == whole.token_ids and text == whole.text and finish == "length"
    first, second = servicer.requests
    assert not first.HasField("resume")
    assert list(second.resume.token_ids) == whole.token_ids[:5]
    assert second.resume.text == "".join(map(word, whole.token_ids[:5]))
    # The continuation carries the id the coordinator gave the request.
    assert second.request_id == "named-by-the-coordinator"


async def test_a_coordinator_gone_after_the_last_message_ends_the_stream_as_it_is() -> None:
    """The whole output arrived (a coordinator frozen before its status, given up by the
    keepalive): nothing to continue, and no error after a complete result."""
    servicer = GoingAway(grpc.StatusCode.UNAVAILABLE, cut_after=MAX_TOKENS)
    tokens, _, finish = await run(servicer)
    assert len(tokens) == MAX_TOKENS and finish == "length"
    assert len(servicer.requests) == 1


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
async def test_a_final_error_is_raised_never_continued(code: grpc.StatusCode) -> None:
    servicer = GoingAway(code, cut_after=5, final=True)
    with pytest.raises(GenerationError) as caught:
        await run(servicer)
    assert caught.value.code == code
    assert len(servicer.requests) == 1
