"""The ASGI app of the HTTP front door: routes, auth, and the answers (JSON or SSE).

A raw ASGI 3 app (no framework: a handful of routes, and the streamed path stays short).
Every ``Generate``-like request goes through ``CoordinatorService.stream``, the very path of
gRPC ``Generate``: the request's limits, validation, a stream slot for the client, then the
dispatcher (failover and exact resume). Auth asks the gRPC auth interceptor on behalf of the
gRPC method the endpoint stands for, so the tokens, roles and answers are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.http import openai_api
from coordinator.http.openai_api import ApiError, Call
from coordinator.registry import Registry
from coordinator.service import CoordinatorService, GenerateError
from omni_rpc import config
from omni_rpc.security import HEALTH_PREFIX, AuthInterceptor, bearer, identity_of_token
from omni_rpc.v1 import generate_pb2

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# The gRPC method whose permission each endpoint needs (omni_rpc/security.py POLICY).
GENERATE = f"/{config.COORDINATOR_SERVICE}/Generate"
LIST_NODES = f"/{config.COORDINATOR_SERVICE}/ListNodes"
HEALTH = f"{HEALTH_PREFIX}Check"

# A whole call's deadline in seconds, as a gRPC client's deadline (OpenAI has none).
TIMEOUT_HEADER = b"x-request-timeout"
REQUEST_ID_HEADER = b"x-request-id"

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
# The coordinator's verdict is final, as gRPC's omni-final trailer says: the official OpenAI
# clients read this header before retrying a 429 or 5xx by themselves.
NO_RETRY = (b"x-should-retry", b"false")


@dataclass(frozen=True)
class Route:
    handler: str
    method: str  # the gRPC method whose permission it needs


ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/completions"): Route("completions", GENERATE),
    ("POST", "/v1/chat/completions"): Route("chat", GENERATE),
    ("GET", "/v1/models"): Route("models", LIST_NODES),
    ("GET", "/health"): Route("health", HEALTH),
}
PATHS = {path for _, path in ROUTES}
MODEL_PREFIX = "/v1/models/"


class ClientGone(Exception):
    """The client disconnected: nobody to answer."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def client_identity(scope: Scope, token: str | None) -> str:
    """Who is calling, for per-client limits, named as gRPC's ``client_identity`` names it:
    the token, else the peer's address (so a client counts once on both transports)."""
    if token:
        return identity_of_token(token)
    client = scope.get("client")
    if not client:
        return "peer:unknown"
    host = str(client[0])
    return f"peer:ipv6:[{host}]" if ":" in host else f"peer:ipv4:{host}"


def timeout_of(scope: Scope) -> float | None:
    """The caller's deadline from ``x-request-timeout`` (seconds; None: none given)."""
    raw = _header(scope, TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        given = raw.decode("latin-1")
        raise openai_api.invalid(
            "x-request-timeout", f"must be a positive number of seconds, got {given!r}"
        )
    return seconds


class OpenAIApp:
    """``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
    ``GET /v1/models/{model}`` and ``GET /health``."""

    def __init__(
        self,
        service: CoordinatorService,
        auth: AuthInterceptor | None,
        max_body_bytes: int = config.MAX_CLIENT_MESSAGE_BYTES,
    ) -> None:
        self.service = service
        self.registry: Registry = service.registry
        self.auth = auth
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not served
            return
        try:
            await self._route(scope, receive, send)
        except ApiError as error:
            await send_error(send, error)
        except ClientGone:
            pass

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        route = ROUTES.get((scope["method"], path))
        if route is None and path.startswith(MODEL_PREFIX) and scope["method"] == "GET":
            route = Route("model", LIST_NODES)
        if route is None:
            if path in PATHS:
                raise ApiError(405, f"method {scope['method']} not allowed on {path}")
            raise ApiError(404, f"no route {path}", code="not_found")
        token = self._authorize(scope, route.method)
        if route.handler == "health":
            await send_json(send, *self.health())
        elif route.handler == "models":
            await send_json(send, 200, self.models())
        elif route.handler == "model":
            await send_json(send, 200, self.model(path.removeprefix(MODEL_PREFIX)))
        else:
            body = await read_json(receive, self.max_body_bytes)
            if route.handler == "chat":
                call = openai_api.chat_call(body)
            else:
                call = openai_api.completion_call(body)
            call.request.request_id = self._request_id(scope)
            timeout = timeout_of(scope)
            client = client_identity(scope, token)
            await until_disconnected(
                receive, send, lambda tracked: self.generate(tracked, call, client, timeout)
            )

    def _authorize(self, scope: Scope, method: str) -> str | None:
        """The caller's bearer token, checked as gRPC checks it for ``method``."""
        raw = _header(scope, b"authorization")
        token = bearer([("authorization", raw)]) if raw is not None else None
        if self.auth is None or self.auth.is_open(method):
            return token
        refused = self.auth.refusal(method, token)
        if refused is not None:
            code, message = refused
            if code == grpc.StatusCode.UNAUTHENTICATED:
                message = "missing or unknown bearer token (header 'Authorization: Bearer <token>')"
            raise openai_api.error_for_status(code, message)
        return token

    @staticmethod
    def _request_id(scope: Scope) -> str:
        given = _header(scope, REQUEST_ID_HEADER)
        # Too long an id is refused by validation, naming the header.
        return given.decode("latin-1") if given else uuid.uuid4().hex

    # -- generation --------------------------------------------------------------------------

    async def generate(self, send: Send, call: Call, client: str, timeout: float | None) -> None:
        created = int(time.time())
        # Closed here, not when collected: a client that goes away frees its node now.
        async with contextlib.aclosing(
            self.service.stream(call.request, client, timeout)
        ) as responses:
            try:
                first = await anext(responses)
            except GenerateError as exc:
                # Nothing sent yet: the answer is an HTTP status, streamed or not.
                raise openai_api.error_for_status(exc.code, exc.message, exc.field) from None
            model = self.served_model(first, call.request.model)
            if call.stream:
                await self._stream(send, call, first, responses, created, model)
            else:
                await self._collect(send, call, first, responses, created, model)

    async def _collect(
        self,
        send: Send,
        call: Call,
        first: generate_pb2.GenerateResponse,
        responses: AsyncGenerator[generate_pb2.GenerateResponse, None],
        created: int,
        model: str,
    ) -> None:
        answer = openai_api.Answer(call, created, model)
        answer.add(first)
        try:
            async for response in responses:
                answer.add(response)
        except GenerateError as exc:
            raise openai_api.error_for_status(exc.code, exc.message, exc.field) from None
        await send_json(send, 200, answer.payload(), request_id=call.request.request_id)

    async def _stream(
        self,
        send: Send,
        call: Call,
        first: generate_pb2.GenerateResponse,
        responses: AsyncGenerator[generate_pb2.GenerateResponse, None],
        created: int,
        model: str,
    ) -> None:
        chunks = openai_api.ChunkEncoder(call, created, model)
        headers = [*SSE_HEADERS, (b"x-request-id", call.request.request_id.encode("latin-1"))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        response: generate_pb2.GenerateResponse | None = first
        ended = False
        try:
            while response is not None:
                audio = chunks.audio(response) if response.outputs else b""
                if response.finish_reason:
                    # The last one: its chunk, the usage, and the end, in one write.
                    body = audio + chunks.delta(response.text, response.finish_reason)
                    if call.include_usage:
                        body += chunks.usage(response)
                    await send_body(send, body + openai_api.DONE, more=False)
                    ended = True
                elif response.text or chunks.needs_role or audio:
                    body = chunks.delta(response.text) if response.text or not audio else b""
                    await send_body(send, body + audio)
                # Read on to the stream's own end (right after the finish): the dispatcher
                # counts the call as served only then, not as cancelled.
                response = await anext(responses, None)
        except GenerateError as exc:
            if not ended:
                error = openai_api.error_for_status(exc.code, exc.message, exc.field)
                await send_body(send, openai_api.error_event(error) + openai_api.DONE, more=False)
            return
        if not ended:  # the dispatcher ends with a finish_reason or an error: not reached
            await send_body(send, openai_api.DONE, more=False)

    def served_model(self, response: generate_pb2.GenerateResponse, asked: str) -> str:
        """The model that served ``response``: its node's model (an alias resolved)."""
        node = self.registry.nodes.get(response.node_id)
        return node.info.model if node is not None and node.info.model else asked

    # -- models and health -------------------------------------------------------------------

    def _model_entry(self, model: str) -> dict[str, Any]:
        nodes = [n for n in self.registry.nodes.values() if n.info.model == model and not n.left]
        aliases = sorted({a for n in nodes for a in n.info.model_aliases if a != model})
        return {
            "id": model,
            "object": "model",
            "created": int(min((n.joined_at for n in nodes), default=time.time())),
            "owned_by": "omni-rpc",
            "aliases": aliases,
            "healthy_nodes": len(self.registry.dispatchable(model)),
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_entry(m) for m in self.registry.models]}

    def model(self, name: str) -> dict[str, Any]:
        for model in self.registry.models:
            entry = self._model_entry(model)
            if name == model or name in entry["aliases"]:
                return entry
        served = ", ".join(self.registry.models) or "none"
        raise ApiError(
            404, f"model {name!r} is not served here; served: {served}", "model", "NOT_FOUND"
        )

    def health(self) -> tuple[int, dict[str, Any]]:
        healthy = len(self.registry.dispatchable())
        body = {
            "status": "ok" if healthy else "unavailable",
            "healthy_nodes": healthy,
            "nodes": len(self.registry.nodes),
            "models": list(self.registry.models),
        }
        return (200 if healthy else 503), body


# -- ASGI helpers ----------------------------------------------------------------------------


async def read_json(receive: Receive, limit: int) -> object:
    """The request body, decoded (ApiError when it is too large or not JSON)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413, f"request body over {limit} bytes (--max-message-bytes)", code="too_large"
            )
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        problem = f"the request body is not valid JSON: {exc}"
        raise ApiError(400, problem, code="invalid_json") from None


async def until_disconnected(
    receive: Receive, send: Send, work: Callable[[Send], Coroutine[Any, Any, None]]
) -> None:
    """Run ``work(send)``; cancel it the moment the client disconnects, so that the dispatch
    generator it holds is closed at once (the node stops generating for nobody)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False
    complete = False

    async def tracked(message: Message) -> None:
        nonlocal complete
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            complete = True

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        # Also said once the response is complete: only a client gone before counts.
        if not complete:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work(tracked)
    except asyncio.CancelledError:
        if not gone:
            raise  # the server's own cancellation (shutdown past its grace)
        task.uncancel()
    finally:
        watcher.cancel()


async def send_body(send: Send, body: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def send_json(
    send: Send,
    status: int,
    payload: object,
    headers: list[tuple[bytes, bytes]] | None = None,
    request_id: str = "",
) -> None:
    all_headers = [*JSON_HEADERS, *(headers or [])]
    if request_id:
        all_headers.append((b"x-request-id", request_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send_body(send, openai_api.dumps(payload), more=False)


async def send_error(send: Send, error: ApiError) -> None:
    headers = [NO_RETRY]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send_json(send, error.status, error.payload(), headers)
