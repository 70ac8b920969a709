"""The HTTP front door's translation, in process: OpenAI JSON to GenerateRequest, the answers
back (JSON and SSE chunks), the error mapping, and a client that disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import grpc
import pytest

from coordinator.http import openai_api
from coordinator.http.app import OpenAIApp, Scope, client_identity, until_disconnected
from coordinator.http.openai_api import ApiError, chat_call, completion_call
from coordinator.service import GenerateError
from omni_rpc.v1 import generate_pb2


def refused(build: Any, body: object) -> ApiError:
    with pytest.raises(ApiError) as caught:
        build(body)
    return caught.value


def test_a_completion_request_carries_every_supported_parameter() -> None:
    call = completion_call(
        {
            "model": "m",
            "prompt": "hello",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "seed": -(2**40),
            "stop": "x",
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "user-42",
            "n": 1,
            "echo": False,
            "logprobs": None,
            "best_of": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
        }
    )
    request, sampling = call.request, call.request.sampling
    assert (request.model, request.prompt) == ("m", "hello")
    assert request.affinity_key == "user-42"  # OpenAI's end-user id routes the session
    assert sampling.max_tokens == 7
    assert sampling.HasField("temperature") and sampling.temperature == 0
    assert sampling.top_p == 0.5 and sampling.top_k == 3 and sampling.seed == -(2**40)
    assert list(sampling.stop) == ["x"] and sampling.ignore_eos
    assert call.stream and call.include_usage and not call.chat


def test_completion_defaults_follow_openai() -> None:
    call = completion_call({"prompt": "p"})
    assert call.request.sampling.max_tokens == openai_api.COMPLETIONS_DEFAULT_MAX_TOKENS
    assert not call.request.sampling.HasField("temperature")
    assert not call.stream and not call.include_usage and call.request.model == ""
    # A chat without max_tokens takes the server's default (the field stays unset).
    chat = chat_call({"messages": [{"role": "user", "content": "hi"}]})
    assert not chat.request.sampling.HasField("max_tokens")


@pytest.mark.parametrize(
    ("prompt", "text", "ids"),
    [
        ("text", "text", []),
        (["text"], "text", []),
        ([1, 2, 3], "", [1, 2, 3]),
        ([[4, 5]], "", [4, 5]),
    ],
)
def test_prompt_forms(prompt: object, text: str, ids: list[int]) -> None:
    request = completion_call({"prompt": prompt}).request
    assert (request.prompt, list(request.prompt_token_ids)) == (text, ids)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "a list of 2 prompts"),
        ({"prompt": [[1], [2]]}, "prompt", "a list of 2 prompts"),
        ({"prompt": [1, "a"]}, "prompt", "32-bit integers"),
        ({"prompt": [2**31]}, "prompt", "32-bit integers"),
        ({"prompt": 5}, "prompt", "must be a string"),
        ({}, "prompt", "is required"),
        ({"prompt": "p", "n": 2}, "n", "only n=1"),
        ({"prompt": "p", "echo": True}, "echo", "not supported"),
        ({"prompt": "p", "logprobs": 0}, "logprobs", "not supported"),
        ({"prompt": "p", "best_of": 2}, "best_of", "not supported"),
        ({"prompt": "p", "suffix": "s"}, "suffix", "not supported"),
        ({"prompt": "p", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"prompt": "p", "frequency_penalty": 1}, "frequency_penalty", "not supported"),
        ({"prompt": "p", "logit_bias": {"1": 5}}, "logit_bias", "not supported"),
        ({"prompt": "p", "tools": []}, "tools", "unrecognized"),  # chat's, not here
        ({"prompt": "p", "bogus": 1}, "bogus", "unrecognized"),
        ({"prompt": "p", "max_tokens": "7"}, "max_tokens", "must be an integer"),
        ({"prompt": "p", "max_tokens": True}, "max_tokens", "must be an integer"),
        ({"prompt": "p", "max_tokens": 2**40}, "max_tokens", "out of range"),
        ({"prompt": "p", "temperature": "hot"}, "temperature", "must be a number"),
        ({"prompt": "p", "stop": [1]}, "stop", "strings"),
        ({"prompt": "p", "stream": "yes"}, "stream", "true or false"),
        ({"prompt": "p", "stream_options": {"include_usage": True}}, "stream_options", "only"),
        ({"prompt": "p", "model": 3}, "model", "must be a string"),
    ],
)
def test_completion_refusals_name_the_parameter(body: object, param: str, words: str) -> None:
    error = refused(completion_call, body)
    assert (error.status, error.param) == (400, param)
    assert words in error.message and error.message.startswith(param)


def test_a_body_that_is_not_an_object_is_refused() -> None:
    assert refused(completion_call, ["prompt"]).status == 400


def test_chat_messages_and_parts() -> None:
    call = chat_call(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "name": None, "tool_calls": []},
            ],
            "max_completion_tokens": 9,
            "tools": None,
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "logprobs": False,
        }
    )
    messages = call.request.messages
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[0].content == "be brief"
    assert [p.text for p in messages[1].parts] == ["a", "b"]
    assert messages[2].content == "" and not messages[2].parts
    assert call.chat and call.request.sampling.max_tokens == 9


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": "hi"}, "messages", "non-empty"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "must be a string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].image_url.url",
            "must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].input_audio",
            "must be an object",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video_url"}]}]},
            "messages[0].content[0]",
            "video_url parts are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "weird"}]}]},
            "messages[0].content[0]",
            "unknown content part type",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", ""),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 3,
                "max_completion_tokens": 4,
            },
            "max_completion_tokens",
            "differs",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools", "not supported"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "not supported",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", ""),
        ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo", "unrecognized"),
        ({"messages": [{"role": "user", "content": "x"}], "prompt": "p"}, "prompt", "unrecognized"),
    ],
)
def test_chat_refusals_name_the_parameter(body: object, param: str, words: str) -> None:
    error = refused(chat_call, body)
    assert (error.status, error.param) == (400, param)
    assert words in error.message


def test_every_grpc_status_has_an_http_status() -> None:
    assert set(openai_api.HTTP_STATUS) == set(grpc.StatusCode)
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
    for code, status in expected.items():
        error = openai_api.error_for_status(code, "why")
        assert error.status == status
        payload = error.payload()["error"]
        assert payload["message"] == "why" and payload["code"] == code.name
        assert payload["type"] == openai_api.ERROR_TYPE[status]


def test_validation_fields_come_back_as_openai_parameters() -> None:
    assert openai_api.openai_param("sampling.temperature") == "temperature"
    assert openai_api.openai_param("prompt_token_ids") == "prompt"
    assert openai_api.openai_param("messages[2].parts[1].media") == "messages[2].content[1].media"
    error = openai_api.error_for_status(grpc.StatusCode.INVALID_ARGUMENT, "x", "sampling.top_p")
    assert error.param == "top_p"


def response(text: str, finish: str = "", prompt: int = 0, completion: int = 0) -> Any:
    out = generate_pb2.GenerateResponse(text=text, finish_reason=finish, node_id="n")
    if finish:
        out.usage.prompt_tokens = prompt
        out.usage.completion_tokens = completion
    return out


def test_non_streamed_answers() -> None:
    call = completion_call({"prompt": "p"})
    call.request.request_id = "r1"
    answer = openai_api.Answer(call, 5, "m")
    answer.add(response(" a"))
    answer.add(response(" b", "length", 2, 2))
    assert answer.payload() == {
        "id": "cmpl-r1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "text": " a b", "logprobs": None, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 2,
            "completion_tokens": 2,
            "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    chat = chat_call({"messages": [{"role": "user", "content": "x"}]})
    chat.request.request_id = "r2"
    answer = openai_api.Answer(chat, 5, "m")
    answer.add(response(" c", "stop", 1, 1))
    payload = answer.payload()
    assert payload["id"] == "chatcmpl-r2" and payload["object"] == "chat.completion"
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": " c"}
    assert payload["choices"][0]["finish_reason"] == "stop"


def events(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    return [
        e.removeprefix("data: ") if e == "data: [DONE]" else json.loads(e.removeprefix("data: "))
        for e in data.decode().split("\n\n")
        if e
    ]


def test_stream_chunks_are_openai_chunks() -> None:
    call = chat_call(
        {
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    call.request.request_id = "r"
    chunks = openai_api.ChunkEncoder(call, 7, 'm"odel')
    assert chunks.needs_role
    first, second = events(chunks.delta("\u00e9\n") + chunks.delta(' "b"', "stop"))
    assert not chunks.needs_role
    assert first == {
        "id": "chatcmpl-r",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": 'm"odel',
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "\u00e9\n"},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert second["choices"][0]["delta"] == {"content": ' "b"'}
    assert second["choices"][0]["finish_reason"] == "stop"
    (usage,) = events(chunks.usage(response("", "stop", 3, 4)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
    plain = completion_call({"prompt": "p", "stream": True})
    plain.request.request_id = "q"
    (chunk,) = events(openai_api.ChunkEncoder(plain, 1, "m").delta(" t"))
    assert "usage" not in chunk
    assert chunk["choices"] == [{"index": 0, "text": " t", "logprobs": None, "finish_reason": None}]
    error = openai_api.error_for_status(grpc.StatusCode.UNAVAILABLE, "gone")
    assert events(openai_api.error_event(error))[0]["error"]["code"] == "UNAVAILABLE"


def test_client_identity_matches_the_grpc_naming() -> None:
    scope: Scope = {"client": ("127.0.0.1", 5555)}
    assert client_identity(scope, None) == "peer:ipv4:127.0.0.1"
    assert client_identity({"client": ("::1", 1)}, None) == "peer:ipv6:[::1]"
    assert client_identity(scope, "tok").startswith("token:")


# -- the app, with a fake service ---------------------------------------------------------


class FakeService:
    """CoordinatorService.stream's shape: yields some responses, then waits (a slow node)."""

    def __init__(self) -> None:
        self.registry = type("R", (), {"nodes": {}, "models": ()})()
        self.closed = asyncio.Event()
        self.started = asyncio.Event()
        self.error: GenerateError | None = None

    async def stream(
        self, request: generate_pb2.GenerateRequest, client: str, timeout: float | None
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        if self.error is not None:
            raise self.error
        try:
            yield response(" one")
            self.started.set()
            await asyncio.Event().wait()  # the next token never comes
            yield response("")  # pragma: no cover
        finally:
            self.closed.set()


class FakeClient:
    """An ASGI client: sends one body, records what comes back, disconnects on demand."""

    def __init__(self, body: bytes) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "http.request", "body": body, "more_body": False})
        self.sent: list[dict[str, Any]] = []
        self.got_data = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message.get("body"):
            self.got_data.set()

    def disconnect(self) -> None:
        self.inbox.put_nowait({"type": "http.disconnect"})


def http_scope(path: str, method: str = "POST") -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": [], "client": ("h", 1)}


async def test_a_client_gone_mid_stream_closes_the_dispatch_at_once() -> None:
    service = FakeService()
    app = OpenAIApp(service, None)  # type: ignore[arg-type]
    client = FakeClient(b'{"prompt": "p", "stream": true}')
    served = asyncio.create_task(app(http_scope("/v1/completions"), client.receive, client.send))
    await client.got_data.wait()
    assert not service.closed.is_set()
    client.disconnect()
    await served  # returns (no exception) once the client is gone
    assert service.closed.is_set()
    assert client.sent[0]["status"] == 200


async def test_errors_before_any_output_are_http_statuses() -> None:
    service = FakeService()
    service.error = GenerateError(grpc.StatusCode.NOT_FOUND, "model 'x' is not served here")
    app = OpenAIApp(service, None)  # type: ignore[arg-type]
    for body in (b'{"prompt": "p", "stream": true}', b'{"prompt": "p"}'):
        client = FakeClient(body)
        await app(http_scope("/v1/completions"), client.receive, client.send)
        assert client.sent[0]["status"] == 404
        assert (b"x-should-retry", b"false") in client.sent[0]["headers"]
        assert json.loads(client.sent[1]["body"])["error"]["code"] == "NOT_FOUND"
    for scope, status in (
        (http_scope("/v1/nowhere"), 404),
        (http_scope("/v1/completions", "GET"), 405),
    ):
        client = FakeClient(b"")
        await app(scope, client.receive, client.send)
        assert client.sent[0]["status"] == status
    client = FakeClient(b"{not json")
    await app(http_scope("/v1/completions"), client.receive, client.send)
    assert client.sent[0]["status"] == 400
    assert json.loads(client.sent[1]["body"])["error"]["code"] == "invalid_json"


async def test_until_disconnected_lets_a_finished_answer_be() -> None:
    client = FakeClient(b"")
    await client.receive()  # the body was read

    async def answer(send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": False})
        client.disconnect()  # as uvicorn says once the response is complete
        await asyncio.sleep(0)

    await until_disconnected(client.receive, client.send, answer)
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
